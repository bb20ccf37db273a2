"""`--train.precision=auto` and `--train.jit_compile=auto`: decided per machine, once per run.

Machines differ: on one CPU XLA makes the train step faster, on another several times
slower; bfloat16 matmuls run 2-3x faster than float32 on CPUs with AMX or AVX512_BF16
(oneDNN) and are emulated slowly elsewhere. So neither is fixed in a preset:

- precision auto -> `mixed_bfloat16` on GPUs of compute capability >= 8.0 (all visible
  GPUs), or with no GPU on CPUs whose flags include `amx_bf16` or `avx512_bf16`;
  else `float32`. (A rule from the hardware: mixed precision changes the numerics, so
  it is not chosen by a noisy timing.)
- jit_compile auto -> times this model's forward + backward (the step's compute part,
  `step.make_grad_fn`, on a random batch of the run's shape; no weight changes)
  compiled and uncompiled, in alternating rounds, and keeps the faster. Dropless MoE
  cannot compile, so it is `false` without timing.

The loop resolves both before training, prints each decision with its reason and saves
them in config.json (`jit_compile`, `precision`, `auto_decisions`); a resumed run reads
them back and decides nothing again. With several workers the chief times (inside the
strategy, where the train step runs: mirrored variables can only be read in a replica
context; the timed forward+backward has no collectives) while the others wait, and its
decision is broadcast to all, so every worker compiles the same way; where the train
step reuses the timed function, every worker traces and compiles it both ways at the
same time first (`resolve_jit_compile`).

Example:
    >>> precision, why = resolve_precision("auto")
    >>> why
    'auto -> mixed_bfloat16: CPU has avx512_bf16 (no GPU)'
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from deepseek_tf.autojit import choose_xla, cpu_flags, median_times  # noqa: F401

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of every visible GPU."""
    import tensorflow as tf

    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        caps.append(tuple(cc) if cc else (0, 0))
    return caps


def choose_precision(flags: set[str], gpu_caps: list[tuple[int, int]]) -> tuple[str, str]:
    """(precision, reason) from the hardware (the rule of the module doc)."""
    if gpu_caps:
        ok = all(cc >= (8, 0) for cc in gpu_caps)
        caps = ", ".join(f"{a}.{b}" for a, b in gpu_caps)
        return (("mixed_bfloat16", f"every GPU has compute capability >= 8.0 ({caps})") if ok
                else ("float32", f"a GPU has compute capability < 8.0 ({caps})"))
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return "mixed_bfloat16", f"CPU has {' and '.join(have)} (no GPU)"
    return "float32", "CPU has neither AMX nor AVX512_BF16 (no GPU)"


def precision_warning(precision: str, gpu_caps: list[tuple[int, int]]) -> str | None:
    """A note for an explicit `mixed_float16` on a machine without GPUs (None otherwise).

    On CPUs, float16 matmuls outside XLA take a slow path: bench/compare_hf.py measured
    a train step 85x slower than mixed_bfloat16 (13.7 s vs 0.16 s, AMD EPYC with
    AVX512_BF16), while XLA's float16 was close to float32.
    """
    if precision != "mixed_float16" or gpu_caps:
        return None
    return ("warning: mixed_float16 without a GPU: CPUs run float16 matmuls outside XLA in a "
            "slow path (a train step measured 85x slower than mixed_bfloat16); use "
            "--train.precision=mixed_bfloat16 or auto, or keep --train.jit_compile=auto/true")


def resolve_precision(value: str) -> tuple[str, str]:
    """(precision, reason): `value` itself unless it is "auto"."""
    if value != "auto":
        return value, f"{value} (given)"
    choice, why = choose_precision(cpu_flags(), gpu_compute_capabilities())
    return choice, f"auto -> {choice}: {why}"


def random_batch(vocab_size: int, accum: int, batch: int, seq: int, seed: int = 0) -> dict:
    """A packed training batch (A, B, T) of random tokens, as the pipeline yields."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(accum, batch, seq + 1)).astype(np.int32)
    shape = (accum, batch, seq)
    b = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
         "segment_ids": np.ones(shape, np.int32),
         "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape).copy(),
         "loss_mask": np.ones(shape, np.float32)}
    return {k: tf.constant(v) for k, v in b.items()}


def grad_norm_fns(model, tcfg, seq_len: int, strategy=None, objective=None,
                  built: dict | None = None) -> dict[str, Callable[[], float]]:
    """{"no_xla": fn, "xla": fn}: the step's forward + backward without and with XLA, each
    a callable running it on a random batch of the run's shape (`grad_norm_fn`).

    The forward + backward runs inside `strategy.run` (the default strategy if None), as
    in the train step: distributed (mirrored) variables can only be read in a replica
    context. It has no collectives, so each worker runs its own copy. With `built` (a
    dict), the two grad functions are left in it keyed by `jit` (True / False): the
    train step may call the chosen one, whose trace and XLA compilation are then done
    (`objective` must be the run's token objective for that; None runs the token
    cross entropy).
    """
    import tensorflow as tf

    from deepseek_tf.train.step import make_grad_fn, xla_twin

    strategy = strategy or tf.distribute.get_strategy()
    batch = random_batch(model.config.vocab_size, tcfg.grad_accum_steps, tcfg.batch_size,
                         seq_len, tcfg.seed)
    plain = make_grad_fn(model, tcfg.grad_accum_steps, False, objective)
    fns = {False: plain, True: xla_twin(plain)}  # one trace of the model for both
    if built is not None:
        built.update(fns)
    return {"no_xla": grad_norm_fn(fns[False], tcfg, batch, strategy),
            "xla": grad_norm_fn(fns[True], tcfg, batch, strategy)}


def grad_norm_fn(grad_fn, tcfg, batch, strategy):
    """A callable running `grad_fn` (`step.make_grad_fn`) on `batch` inside `strategy`
    -> the gradients' global norm (a float).

    It returns a value computed from every gradient on purpose: the uncompiled grad
    function is inlined into the caller's graph, and a caller that kept only the loss
    would let TensorFlow prune the whole backward pass from the timing (it did: `auto`
    compared XLA's forward + backward with a forward alone and chose no XLA wrongly).
    The arguments have the types the train step passes (tensors), so the step reuses
    the traced function.
    """
    import tensorflow as tf

    denom = tf.constant(float(np.prod(batch["targets"].shape)))
    scale = tf.constant(1.0)
    seed = tf.constant([tcfg.seed, 0], tf.int32)  # the dtype of the step's folded seed

    @tf.function(autograph=False)
    def run():
        norm = strategy.run(lambda: tf.linalg.global_norm(grad_fn(batch, denom, scale,
                                                                  seed)[0]))
        return strategy.experimental_local_results(norm)[0]

    return lambda: float(run())


def choose_jit(times: dict[str, float], margin: float = 1.0) -> tuple[bool, str]:
    """(use XLA, reason) from the medians of `grad_norm_fns`' callables (`median_times`):
    XLA if at least `margin`x faster."""
    return choose_xla(times, "forward+backward", margin)


def resolve_jit_compile(exp, model, agree=lambda v: v, log=print, strategy=None,
                        measure: bool = True, objective=None,
                        built: dict | None = None) -> tuple[str, str]:
    """("true"/"false", reason) for `exp.train.jit_compile` ("auto" is measured with
    `model` inside `strategy`); `agree(int) -> int` gives every worker the chief's answer.

    Only the worker with `measure` (the chief) times; the others wait in `agree`. With
    `built` (the train step will reuse the grad function chosen, see `grad_norm_fns`),
    every worker first traces and XLA-compiles both ways at once, then all meet in
    `agree` before the chief's timed rounds, which so run alone: after the decision each
    worker's chosen function is ready. (Before, the other workers traced and compiled
    the chosen one only after the chief's timing, while the chief waited for them at
    the first step's all-reduce: V4-tiny's 2-worker start took the two one after the
    other, ~55 s each.) Without `built` the others compile nothing for the timing (with
    W workers on one machine, W warm-ups they would not use would share its cores).
    `objective`: as in `grad_norm_fns`.
    """
    value = exp.train.jit_compile
    if value != "auto":
        return value, f"{value} (given)"
    if exp.model.n_routed_experts and exp.model.capacity_factor <= 0:
        return "false", "auto -> false: dropless MoE has data-dependent shapes (no XLA)"
    fns, warmup = None, 2
    if built is not None:
        log("jit_compile=auto: tracing and compiling the step's forward+backward with and "
            "without XLA ...")
        fns = grad_norm_fns(model, exp.train, exp.data.seq_len, strategy, objective, built)
        for fn in fns.values():
            fn()
        agree(0)                  # every worker has compiled: the chief times alone
        warmup = 1
    if not measure:
        log("jit_compile=auto: waiting for the chief's timing ...")
        choice = "true" if agree(0) else "false"
        return choice, f"auto -> {choice}: the chief's timing"
    log("jit_compile=auto: timing the step's forward+backward with and without XLA ...")
    fns = fns or grad_norm_fns(model, exp.train, exp.data.seq_len, strategy, objective)
    use, why = choose_jit(median_times(fns, warmup=warmup))
    agree(int(use))
    choice = "true" if use else "false"
    return choice, f"auto -> {choice}: {why}"


def note(exp, **reasons) -> str:
    """`auto_decisions` with `reasons` ({field: reason}) merged in: "field: reason | ..."."""
    parts = dict(p.split(": ", 1) for p in exp.train.auto_decisions.split(" | ") if ": " in p)
    parts.update({k: v for k, v in reasons.items() if v.startswith("auto")})
    return " | ".join(f"{k}: {v}" for k, v in sorted(parts.items()))


def keep_saved(exp, saved):
    """`exp` with the `saved` run's resolved choices where `exp` says "auto" (resume)."""
    if saved is None:
        return exp
    t, s = exp.train, saved.train
    changes = {f: getattr(s, f) for f in ("jit_compile", "precision")
               if getattr(t, f) == "auto" and getattr(s, f) != "auto"}
    if changes:
        changes["auto_decisions"] = s.auto_decisions
    return with_train(exp, **changes) if changes else exp


def with_train(exp, **changes):
    """`exp` with its train section's `changes`."""
    import dataclasses

    return dataclasses.replace(exp, train=exp.train.replace(**changes))
