"""`python -m deepseek_tf.serve --workdir=DIR`: an OpenAI-compatible HTTP server.

Serves a trained (or converted) workdir's latest checkpoint with the KV-cached decode
loop of `python -m deepseek_tf.generate`, on FastAPI + uvicorn (`pip install
'deepseek_tf[serve]'`):

    POST /v1/chat/completions   the run's chat template (--template to replace it)
    POST /v1/completions        plain text after BOS
    (both stream server-sent events with "stream": true)
    GET  /v1/models, GET /health, GET /metrics (Prometheus text)
    POST /generate              {"prompt": ..., "max_new_tokens": ...} -> {"completion": ...}

Requests arriving within --batch_window_ms of each other decode together (up to
--max_batch completions); the others wait in a queue of --max_queue completions (429 when
full). Every endpoint ends at the run's stops (EOS, the template's end-of-turn marker).
"""

import sys

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()  # XLA programs compiled once per machine (README, "Generating text")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory (trained or converted) to serve.")
flags.DEFINE_string("checkpoint", "", "A checkpoint path to use instead of the latest.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "TCP port to listen on.", lower_bound=1, upper_bound=65535)
flags.DEFINE_string("model_name", "", "The model id clients send (default: the workdir's "
                    "directory name).")
flags.DEFINE_string("template", "", "Chat template of /v1/chat/completions (default: the "
                    "run's --data.template).")
flags.DEFINE_integer("max_length", 0, "Cache length per completion (prompt + new tokens); 0 = "
                     "the model's max_position_embeddings.", lower_bound=0)
flags.DEFINE_integer("max_batch", 16, "Most completions decoded together.", lower_bound=1)
flags.DEFINE_integer("max_queue", 64, "Most completions waiting for a batch; more get HTTP "
                     "429.", lower_bound=1)
flags.DEFINE_float("batch_window_ms", 10.0, "Milliseconds to wait after a request for others "
                   "to join its batch.", lower_bound=0.0)
flags.DEFINE_float("request_timeout", 300.0, "Seconds a request may take, queueing included "
                   "(then HTTP 504).", lower_bound=0.001)
dflags.define_jit_compile("auto", "Compile each decode step with XLA: true, false, or auto "
                          "= time a few steps both ways on this machine first and keep the "
                          "faster (with XLA, then the same for the prefill at 128 and 512 "
                          "prompt tokens).")
flags.DEFINE_bool("absorb", True, "MLA: decode in latent space (absorbed projections).")
FLAGS = flags.FLAGS


def _require_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"the server needs the serve extra ({e.name} is missing): pip install "
                        f"'deepseek_tf[serve]'") from e


def _check_port():
    import socket
    try:
        with socket.create_server((FLAGS.host, FLAGS.port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {FLAGS.host}:{FLAGS.port} ({e.strerror}); choose "
                        f"another --port or --host.") from e


def main(argv):
    _require_extra()
    _check_port()
    import uvicorn

    def log(message):
        print(message, file=sys.stderr, flush=True)

    from deepseek_tf.serve.server import load_service

    service = load_service(
        FLAGS.workdir, checkpoint=FLAGS.checkpoint, model_name=FLAGS.model_name,
        template=FLAGS.template, max_length=FLAGS.max_length, max_batch=FLAGS.max_batch,
        max_queue=FLAGS.max_queue, window=FLAGS.batch_window_ms / 1000,
        timeout=FLAGS.request_timeout, jit_compile=FLAGS.jit_compile, absorb=FLAGS.absorb,
        log=log)
    from deepseek_tf.serve.api import create_app

    service.engine.start()
    log(f"serving {service.model_name!r} on http://{FLAGS.host}:{FLAGS.port} (OpenAI API "
        f"under /v1)")
    try:
        uvicorn.run(create_app(service), host=FLAGS.host, port=FLAGS.port, log_level="warning")
    finally:
        service.engine.stop()


def entry():
    dflags.run(main, required=("workdir",))


if __name__ == "__main__":
    entry()
