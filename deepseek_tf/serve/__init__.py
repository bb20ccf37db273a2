"""An OpenAI-compatible HTTP server on the generator: `python -m deepseek_tf.serve`.

    engine.py    rows, the bounded queue and the decode thread (batches per step window)
    protocol.py  request bodies (OpenAI's fields, strict types) and the error JSON
    api.py       the FastAPI app: /v1/chat/completions, /v1/completions (SSE streaming),
                 /v1/models, /health, /metrics, /generate
    metrics.py   Prometheus counters, gauges and histograms
    server.py    load_service (a run -> the Service), BackgroundServer (uvicorn on a thread)
    __main__.py  flags, loading the run, uvicorn

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client).
"""
