"""Load test of the HTTP server: requests/s, time to first token (p50 / p99) and tokens/s
with 1, 4 and 16 concurrent streaming clients.

The server is `python -m deepseek_tf.serve`'s (`load_service`: --jit_compile=auto, batches
of up to 16 completions) on uvicorn, in this process; the clients run in their own process
(`--side=clients`: the standard library only, no TensorFlow), each streaming
`/v1/completions` requests back to back over localhost (greedy, `max_tokens` each; tokens
are counted from the server's usage, so a completion that ends early at EOS counts what it
made). Time to first token is from sending a request to its first text chunk.

    python bench/serve_load.py                       # the issue-3 model, random weights
    python bench/serve_load.py --workdir=runs/tiny   # a trained run
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)


def _stream(url: str, body: dict) -> tuple[float | None, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed request."""
    import http.client
    import json
    import time
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first, tokens = None, 0
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return first, tokens


def clients(spec: dict) -> dict:
    """The client side: every level of concurrency in turn; {level: measurements}."""
    import random
    import threading
    import time

    rng = random.Random(0)
    out = {}
    for level in [1] + spec["levels"]:  # the first round of 1 is a warm-up
        ttft, tokens, errors = [], [], []

        def client(k):
            for _ in range(spec["requests"]):
                prompt = "".join(chr(rng.randrange(97, 123)) for _ in range(spec["prompt"]))
                try:
                    first, n = _stream(spec["url"], {
                        "model": spec["model"], "prompt": prompt, "temperature": 0,
                        "max_tokens": spec["max_tokens"], "stream": True,
                        "stream_options": {"include_usage": True}})
                except Exception as e:  # noqa: BLE001 (reported)
                    errors.append(repr(e))
                    return
                tokens.append(n)
                if first is not None:
                    ttft.append(first)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(level)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[str(level)] = {"seconds": time.perf_counter() - t0, "ttft": ttft,
                           "tokens": sum(tokens), "requests": len(tokens), "errors": errors}
    return out


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def main(argv=None):
    import json
    import tempfile

    p = common.parser(__doc__)
    p.add_argument("--workdir", default="", help="serve a trained run instead")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max_tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--prompt_tokens", type=int, default=16, help="prompt length (bytes)")
    p.add_argument("--jit_compile", default="auto", choices=["auto", "true", "false"])
    args = common.start(p, argv)
    if common.run_as_side(args, {"clients": clients}):
        return
    if args.smoke:
        args.requests, args.max_tokens, args.prompt_tokens, args.levels = 1, 4, 8, "1,16"
        args.jit_compile = "false"  # no XLA compile per batch size: seconds
    levels = [int(x) for x in args.levels.split(",")]

    from deepseek_tf.serve.server import BackgroundServer, load_service

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or _random_run(os.path.join(tmp, "run"), args.smoke)
        logs = []
        service = load_service(workdir, max_batch=max(levels), max_queue=4 * max(levels),
                               jit_compile=args.jit_compile, log=logs.append)
        jit = "; ".join(l for l in logs if "auto" in l) or f"jit_compile={args.jit_compile}"
        print(f"server: {args.workdir or 'issue-3 model (random weights)'}, cache "
              f"{service.engine.max_length}; {jit}; batches of up to {max(levels)} per {service.engine.window * 1000:g} ms window; "
              f"{args.requests} requests x {args.max_tokens} tokens per client")
        with BackgroundServer(service) as server:
            spec = os.path.join(tmp, "clients.json")
            with open(spec, "w") as f:
                json.dump({"url": server.url, "model": service.model_name, "levels": levels,
                           "requests": args.requests, "max_tokens": args.max_tokens,
                           "prompt": args.prompt_tokens}, f)
            result = common.run_side([os.path.abspath(__file__), "--side=clients",
                                      f"--spec={spec}"])
    print(f"{'clients':<8} {'requests/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'tokens/s':>10}")
    rates = {}
    for level in levels:
        r = result[str(level)]
        if r["errors"]:
            raise SystemExit(f"error: {len(r['errors'])} requests failed: {r['errors'][0]}")
        rates[level] = r["tokens"] / r["seconds"]
        print(f"{level:<8} {r['requests'] / r['seconds']:>10,.2f} "
              f"{1000 * percentile(r['ttft'], 0.5):>12,.1f} "
              f"{1000 * percentile(r['ttft'], 0.99):>12,.1f} {rates[level]:>10,.1f}")
    print(f"batching: {max(levels)} clients give {rates[max(levels)] / rates[min(levels)]:.1f}x "
          f"the tokens/s of {min(levels)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min)")


def _random_run(path: str, smoke: bool) -> str:
    """A workdir holding the issue-3 model (or the smoke model) with random weights."""
    import tensorflow as tf

    from deepseek_tf.config import DataConfig, Experiment
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.workdir import write_workdir

    cfg = common.bench_config(smoke)[0]
    tf.keras.utils.set_random_seed(0)
    exp = Experiment(model=cfg, data=DataConfig(seq_len=cfg.max_position_embeddings))
    return write_workdir(path, DeepSeekCausalLM(cfg), exp, ByteTokenizer())


if __name__ == "__main__":
    main()
