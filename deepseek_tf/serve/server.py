"""Loading a run into a `Service`, and running its app on uvicorn in a background thread.

`python -m deepseek_tf.serve` calls `load_service` and uvicorn; tests and
`bench/serve_load.py` use `BackgroundServer` to serve in their own process.

Example:
    >>> service = load_service("runs/tiny", jit_compile="false")
    >>> with BackgroundServer(service) as server:
    ...     requests.get(server.url + "/health")
"""

from __future__ import annotations

import os
import threading
import time

from deepseek_tf.errors import UserError


def load_service(workdir: str, *, checkpoint: str = "", model_name: str = "",
                 template: str = "", max_length: int = 0, max_batch: int = 16,
                 max_queue: int = 64, window: float = 0.01, timeout: float = 300.0,
                 jit_compile: str = "auto", absorb: bool = True, log=print):
    """A `Service` for a workdir, its decode graph warmed up (its engine not yet started).

    Args:
      workdir: a trained or converted run.
      checkpoint: a checkpoint path instead of the latest.
      model_name: the id clients send (default: the workdir's directory name).
      template: the chat template of /v1/chat/completions (default: the run's).
      max_length: cache length per completion; 0 = the model's max_position_embeddings.
      max_batch, max_queue, window: see `engine.Engine`.
      timeout: seconds per request.
      jit_compile: "auto" (timed on this machine), "true" or "false".
      absorb: MLA decodes in latent space.
      log: progress lines.
    """
    from deepseek_tf.workdir import load_experiment, load_run_tokenizer, load_workdir

    exp = load_experiment(workdir)  # bad input fails before TensorFlow loads
    limit = exp.model.max_position_embeddings
    length = max_length or limit
    if not 2 <= length <= limit:
        raise UserError(f"--max_length={max_length} must be in [2, {limit}] (the model's "
                        f"max_position_embeddings), or 0 for {limit}.")
    from deepseek_tf.generate.decode import Generator
    from deepseek_tf.generate.run import pick_generator
    from deepseek_tf.generate.text import chat_profile
    from deepseek_tf.serve.api import Service
    from deepseek_tf.serve.engine import Engine
    from deepseek_tf.serve.metrics import Metrics

    tok = load_run_tokenizer(workdir, exp)
    profile = chat_profile(exp, tok, template, chat=True)
    model, _ = load_workdir(workdir, checkpoint)
    if jit_compile == "auto":
        gen = pick_generator(model, length, profile.stops, tok.pad_id, absorb, log=log)
    else:
        gen = Generator(model, length, profile.stops, tok.pad_id, absorb=absorb,
                        jit_compile=jit_compile == "true")
    metrics = Metrics()
    engine = Engine(gen, tok, profile.stops, max_batch, max_queue, window, metrics)
    metrics.attach(engine)
    log("warming up the decode graph ...")
    engine.warm_up()
    name = model_name or os.path.basename(os.path.normpath(workdir))
    return Service(engine, tok, profile, name, timeout, metrics)


class BackgroundServer:
    """Serves a `Service` with uvicorn on a thread (port 0: a free port); starts its engine.

    Args:
      service: from `load_service`.
      host, port: where to listen.

    Example:
        >>> with BackgroundServer(service) as server:
        ...     print(server.url)
    """

    def __init__(self, service, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from deepseek_tf.serve.api import create_app

        self.service, self.host = service, host
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.service.engine.start()
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.engine.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
