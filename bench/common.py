"""Shared benchmark helpers: synthetic batches, the real train step, the matmul peak."""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from deepseek_tf.config import OptimConfig, TrainConfig  # noqa: E402
from deepseek_tf.model import DeepSeekCausalLM  # noqa: E402
from deepseek_tf.train.optimizer import make_optimizer  # noqa: E402
from deepseek_tf.train.step import make_train_step  # noqa: E402


def batches(batch: int, seq: int, vocab: int, seed: int = 0):
    """An endless iterator of one random packed batch (as the pipeline yields, A=1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(1, batch, seq + 1)).astype(np.int32)
    b = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
         "segment_ids": np.ones((1, batch, seq), np.int32),
         "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
         "loss_mask": np.ones((1, batch, seq), np.float32)}
    return iter(tf.data.Dataset.from_tensors(b).repeat())


def train_step_runner(cfg, batch: int, seq: int, jit: bool, precision: str = "float32",
                      it=None):
    """A callable running one real optimizer step on a random batch (compiled on its
    first call); its `.out` is the last step's outputs."""
    from deepseek_tf.train import precision as precision_lib
    tf.keras.utils.set_random_seed(0)
    with precision_lib.policy_scope(precision):
        model = DeepSeekCausalLM(cfg)
    tcfg = TrainConfig(batch_size=batch, jit_compile=jit, precision=precision)
    opt = precision_lib.wrap_optimizer(make_optimizer(OptimConfig(), 1000, model), tcfg,
                                       model.trainable_variables)
    step = make_train_step(model, opt, tf.distribute.get_strategy(), tcfg, OptimConfig())
    it = it or batches(batch, seq, cfg.vocab_size)

    def run():
        run.out = step(it)
        float(run.out["loss"])
    run.step, run.iterator = step, it  # for timing without the host sync
    return run


def grad_fn_runner(cfg, batch: int, seq: int, jit: bool, precision: str = "float32"):
    """A callable running the step's forward + backward alone (no optimizer update)."""
    from deepseek_tf.train import precision as precision_lib
    from deepseek_tf.train.step import make_grad_fn
    tf.keras.utils.set_random_seed(0)
    with precision_lib.policy_scope(precision):
        model = DeepSeekCausalLM(cfg)
    grad_fn = make_grad_fn(model, 1, jit)
    b = next(batches(batch, seq, cfg.vocab_size))
    denom = tf.constant(float(batch * seq))
    return lambda: float(grad_fn(b, denom)[1])


def update_runner(cfg, precision: str = "float32"):
    """A callable running the step's per-parameter part alone: global norm, clipping
    coefficient and the (fused AdamW) update, on fixed gradients."""
    from deepseek_tf.train import precision as precision_lib
    from deepseek_tf.train.step import apply_scaled, make_finish_fn
    tf.keras.utils.set_random_seed(0)
    with precision_lib.policy_scope(precision):
        model = DeepSeekCausalLM(cfg)
    variables = model.trainable_variables
    opt = make_optimizer(OptimConfig(), 1000, model)
    finish = make_finish_fn(OptimConfig().clip_norm, False)
    grads = [tf.fill(v.shape, 1e-3) for v in variables]

    @tf.function
    def update():
        g, _, _, coef = finish(grads, tf.constant(1.0))
        apply_scaled(opt, g, variables, coef)
        return opt.iterations

    return lambda: int(update())


def interleaved_medians(runners: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: median seconds}: the runners take turns, round after round, so that a
    noisy shared machine slows them alike (ratios stay meaningful); the package's own
    timer (deepseek_tf.autojit, behind every --jit_compile=auto)."""
    from deepseek_tf.autojit import median_times

    return median_times(runners, rounds, warmup)


def time_train_step(cfg, batch: int, seq: int, jit: bool, steps: int = 8, warmup: int = 2):
    """(median seconds per optimizer step, first-call seconds, last step outputs)."""
    run = train_step_runner(cfg, batch, seq, jit)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    median = interleaved_medians({"step": run}, steps, warmup=warmup - 1)["step"]
    return median, first, run.out


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matmul FLOP/s: the best of plain TF and XLA on n x n matmuls."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    best = 0.0
    for jit in (False, True):
        f = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)), jit_compile=jit)
        float(f(a, b))
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                r = f(a, b)
            float(r)
            best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t0))
    return best


def trainer_choice(cfg, batch: int, seq: int, precision: str = "auto",
                   jit_compile: str = "auto") -> tuple[str, bool, str]:
    """(precision, XLA, reasons): what `--train.precision` / `--train.jit_compile` resolve
    to on this machine for `cfg` (the trainer's own rules, train/autotune.py)."""
    from deepseek_tf.config import DataConfig, Experiment
    from deepseek_tf.train import autotune
    from deepseek_tf.train import precision as precision_lib
    prec, why_p = autotune.resolve_precision(precision)
    exp = Experiment(model=cfg, data=DataConfig(seq_len=seq),
                     train=TrainConfig(batch_size=batch, precision=prec, jit_compile=jit_compile))
    tf.keras.utils.set_random_seed(0)
    with precision_lib.policy_scope(prec):
        model = DeepSeekCausalLM(cfg)
    jit, why_j = autotune.resolve_jit_compile(exp, model, log=lambda *_: None)
    return prec, jit == "true", f"precision {why_p}; jit_compile {why_j}"


def cpu_summary() -> str:
    """CPU model and the flags that matter for matmul speed."""
    from deepseek_tf.train.autotune import cpu_flags
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                        name)
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
              "amx_tile", "amx_bf16", "amx_int8")
    flags = cpu_flags()
    return (f"{name}, {os.cpu_count()} cores; flags: "
            f"{' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}")
