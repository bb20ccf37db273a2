"""Shared benchmark plumbing (the method: bench/README.md).

Import this module before TensorFlow: it keeps TF's start-up lines (CUDA probes, oneDNN
and XLA service notes) off the console as the CLIs do, and puts this checkout first on
the path. It imports no TensorFlow itself, so a reference side (torch) can use it too.

- `start(parser, argv)`: parses the flags (every bench has `--smoke`) and prints the
  machine line (CPU model, the flags that matter for matmul speed, load average).
- `time_calls`, `stats`, `print_stats`: timing rounds, min / median / max.
- `side_env`, `run_side`, `alternate`, `report`: each side of a comparison runs alone,
  in a fresh process with its library's defaults, sides taking turns round after round.
- `launch_small_run`: a small model trained by N local workers through the launcher.
- `train_step_runner` & co.: the trainer's real step on synthetic batches.
- `decode_runners`, `take_turns`, `decode_table`: our KV-cache decode step for several
  models in one process, the models taking turns round after round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow's first import
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deepseek_tf.config import ModelConfig  # noqa: E402  (no TensorFlow)

# The issue-3 benchmark config: hidden 256, 4 layers (first dense), 8 heads, MLA (q_lora
# 128, kv_lora 64, nope 32, rope 16, v 32), dense MLP 768, 16 routed experts of width 128
# + 1 shared, top-2, 4 groups / top-2 groups, vocab 512; batch 8 x 256 tokens.
ISSUE3 = ModelConfig(
    vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    intermediate_size=768, max_position_embeddings=256, attention_type="mla", q_lora_rank=128,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    n_group=4, topk_group=2, first_k_dense_replace=1, capacity_factor=1.25)
BATCH, SEQ = 8, 256
# A matmul-bound config: hidden 1024, 4 layers (first dense), 16 heads, MLA (q_lora 512,
# kv_lora 256, nope 64, rope 32, v 64), dense MLP 2816, 16 routed experts of width 1024
# + 1 shared, top-2, vocab 512; batch 4 x 512 tokens (8 layers and 8 x 512 take over a
# minute per float32 step on 2 cores and two such models do not fit 24 GB).
MATMUL = ISSUE3.replace(
    hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2816,
    max_position_embeddings=512, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=1024)
MATMUL_BATCH, MATMUL_SEQ = 4, 512
# `--smoke`: the same kind of model (MLA + MoE + shared expert), tiny and one layer (MoE):
# tracing costs ~proportionally to layers, and the smoke set runs in the test suite.
SMOKE = ISSUE3.replace(hidden_size=64, num_hidden_layers=1, first_k_dense_replace=0,
                       num_attention_heads=2,
                       intermediate_size=128, q_lora_rank=32, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                       moe_intermediate_size=32, n_group=2, topk_group=1,
                       max_position_embeddings=64)
SMOKE_BATCH, SMOKE_SEQ = 2, 32


CONFIGS = ("issue3", "matmul")


def bench_config(smoke: bool, name: str = "issue3") -> tuple[ModelConfig, int, int]:
    """(model config, batch, sequence length) of the benchmark `name` (one of `CONFIGS`),
    or of `--smoke` whatever the name."""
    if smoke:
        return SMOKE, SMOKE_BATCH, SMOKE_SEQ
    return (MATMUL, MATMUL_BATCH, MATMUL_SEQ) if name == "matmul" else (ISSUE3, BATCH, SEQ)


# ---- the console ----

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


def machine_line() -> str:
    """`machine: <CPU and flags>; load average <1 min>`: the first line of every bench."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"machine: {cpu_summary()}; load average {load:.2f} (1 min)"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the bench's docstring, with `--smoke`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and one round: checks that the bench runs (tests)")
    p.add_argument("--side", help=argparse.SUPPRESS)  # run_as_side
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def start(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses `argv` and prints the machine line. TensorFlow's absl log lines (XLA's
    "Compiled cluster using XLA!") are silenced like the commands' (`quiet_tensorflow`);
    the transformers sides never call this, so torch processes never load TensorFlow."""
    from deepseek_tf.quiet import quiet_tensorflow
    quiet_tensorflow()
    args = p.parse_args(argv)
    print(machine_line(), flush=True)
    return args


# ---- timing ----

def time_calls(fn, n: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `n` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def stats(values) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def print_stats(title: str, rows: dict, unit: str, fmt: str = "{:,.0f}") -> None:
    """One line per row: name, min / median / max of its values (e.g. one per round)."""
    width = max([len(str(k)) for k in rows] + [len(title)])
    print(f"{title:<{width}}  {'min':>10} {'median':>10} {'max':>10}  {unit} "
          f"({len(next(iter(rows.values())))} values each)")
    for name, values in rows.items():
        lo, mid, hi = (fmt.format(v) for v in stats(values))
        print(f"{str(name):<{width}}  {lo:>10} {mid:>10} {hi:>10}")


def interleaved_medians(runners: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: median seconds}: the runners (same process, same library) take turns, round
    after round, so that a noisy shared machine slows them alike; the package's own timer
    (deepseek_tf.autojit, behind every --jit_compile=auto)."""
    from deepseek_tf.autojit import median_times

    return median_times(runners, rounds, warmup)


# ---- sides in their own processes ----

# Variables that set a library's threads or how its threads wait: never set for a side.
THREAD_POLICY = re.compile(r"^(OMP_|KMP_|MKL_|GOMP_|TF_NUM_\w*THREADS$)")


def side_env(extra: dict | None = None) -> dict:
    """The environment of a side's process: this one's without thread-policy variables
    (each library runs with its own defaults), this checkout on PYTHONPATH, TF's start-up
    lines off; `extra` adds bench-specific settings (never thread policy)."""
    env = {k: v for k, v in os.environ.items() if not THREAD_POLICY.match(k)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    for k, v in (extra or {}).items():
        if THREAD_POLICY.match(k):
            raise ValueError(f"{k} is a thread-policy variable: sides run with the defaults")
        env[k] = v
    return env


# Set by the user (importing TensorFlow adds KMP_* variables of its own).
_USER_THREAD_POLICY = sorted(k for k in os.environ if THREAD_POLICY.match(k))


def report(result: dict) -> None:
    """A side's answer to `run_side`: one `RESULT <json>` line on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_as_side(args: argparse.Namespace, sides: dict) -> bool:
    """With `--side=NAME --spec=FILE` (how `alternate` starts a side of this bench):
    `report(sides[NAME](spec))` and True; otherwise False."""
    if not args.side:
        return False
    with open(args.spec) as f:
        report(sides[args.side](json.load(f)))
    return True


def reference_spec(doc: str, argv=None, settings=()) -> dict:
    """The spec of a reference-side script (`--spec=FILE`, written by its bench); the
    names in its "settings" must be among `settings` (the script's own)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="written by the bench, which prints the path")
    path = p.parse_args(argv).spec
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:  # one line and exit 2, as argparse's own errors
        p.error(f"cannot read the spec {path}: {e}. Run the bench with --keep to keep "
                f"its spec files, then pass one of them.")
    if not isinstance(spec, dict):
        p.error(f"the spec {path} is not a JSON object (a bench writes one; pass a file it "
                f"kept with --keep).")
    unknown = [s for s in spec.get("settings") or () if s not in settings]
    if unknown:
        p.error(f"the spec {path} names settings this script does not have: "
                f"{', '.join(map(repr, unknown))}; it has {', '.join(map(repr, settings))} "
                f"(or leave \"settings\" out to run them all)")
    return spec


def launch_small_run(num_workers: int, data_dir: str, workdir: str, args, steps: int,
                     extra: tuple = ()) -> str:
    """Trains the multi-worker benches' small dense model (`args`: layers, hidden_size,
    seq_len, batch_size, log_every) for `steps` steps with `python -m deepseek_tf.launch
    --num_workers=N --cpus_per_worker=1`, XLA off unless `extra` says otherwise; returns
    its output, exits with it if the run fails."""
    flags = [f"--workdir={workdir}", f"--data.data_dir={data_dir}",
             f"--data.seq_len={args.seq_len}", "--model.vocab_size=320",
             f"--model.hidden_size={args.hidden_size}",
             f"--model.intermediate_size={args.hidden_size * 11 // 4}",
             f"--model.num_hidden_layers={args.layers}", "--model.num_attention_heads=4",
             f"--model.max_position_embeddings={args.seq_len}", f"--train.steps={steps}",
             f"--train.batch_size={args.batch_size}", f"--train.log_every={args.log_every}",
             f"--train.eval_every={steps}", "--train.eval_steps=1",
             f"--train.checkpoint_every={steps}", "--train.jit_compile=false", *extra]
    cmd = [sys.executable, "-m", "deepseek_tf.launch", f"--num_workers={num_workers}",
           "--cpus_per_worker=1", "--timeout=3600", "--", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=side_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"error: the {num_workers}-worker run {' '.join(extra)} failed (exit "
                 f"{proc.returncode}):\n{out[-3000:]}")
    return out


def run_side(args: list[str], extra_env: dict | None = None, timeout: float = 3600) -> dict:
    """Runs `python <args>` alone in a fresh process (`side_env`) and returns what it
    `report`ed; a failure ends the bench with the side's stderr."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=side_env(extra_env), timeout=timeout, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"error: side `{' '.join(args)}` failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def alternate(sides: dict, rounds: int) -> dict:
    """{side: [result of each round]}: `sides` maps a name to the argument list of its
    process (or to a function of the round index that returns it); round after round
    each side runs once, alone, one after the other."""
    out = {name: [] for name in sides}
    for r in range(rounds):
        for name, args in sides.items():
            t0 = time.perf_counter()
            out[name].append(run_side(args(r) if callable(args) else args))
            print(f"round {r + 1}/{rounds}: {name} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return out


def tf_threads() -> int:
    """The intra-op threads TensorFlow uses (its default: the CPUs this process may use)."""
    import tensorflow as tf
    return (tf.config.threading.get_intra_op_parallelism_threads()
            or len(os.sched_getaffinity(0)))


def print_sides(sides: dict) -> None:
    """Prints the command line of each side's process (run one alone by hand to compare;
    the bench's `--keep` keeps its files)."""
    for name, args in sides.items():
        print(f"{name} side: python {os.path.relpath(args[0])} {' '.join(args[1:])}")


def print_side_info(results: dict) -> None:
    """Prints each side's `version` and thread count (from its first round), warns if the
    thread counts differ, and names thread-policy variables left out of the sides."""
    for name, rounds in results.items():
        print(f"{name}: {rounds[0]['version']}, {rounds[0]['threads']} threads")
    if len({rounds[0]["threads"] for rounds in results.values()}) > 1:
        print("WARNING: the sides use different thread counts")
    if _USER_THREAD_POLICY:
        print(f"left out of every side's environment: {', '.join(_USER_THREAD_POLICY)}")


# ---- the trainer's step on synthetic data ----

def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """One packed batch of random tokens as numpy arrays [A=1, B, T] (the pipeline's layout)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(1, batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "segment_ids": np.ones((1, batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
            "loss_mask": np.ones((1, batch, seq), np.float32)}


def batches(batch: int, seq: int, vocab: int, seed: int = 0):
    """An endless iterator of one random packed batch (as the pipeline yields, A=1)."""
    import tensorflow as tf
    return iter(tf.data.Dataset.from_tensors(random_batch(batch, seq, vocab, seed)).repeat())


def decode_runners(cfgs: dict, length: int, jit: bool) -> dict:
    """{name: () -> seconds of one decode step at position `length` - 1} (batch 1): the
    generator's own step (`generate.decode.decode_step`) against a cache of `length`
    slots prefilled with `length` - 1 random tokens; the fastest of 5 steps."""
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.generate.decode import decode_step
    from deepseek_tf.model import DeepSeekCausalLM
    prompt = np.random.default_rng(0).integers(0, 256, (1, length - 1)).astype(np.int32)
    pad, token = tf.zeros([1], tf.int32), tf.constant([[7]])
    out = {}
    for key, cfg in cfgs.items():
        tf.keras.utils.set_random_seed(0)
        model = DeepSeekCausalLM(cfg)
        prefill = tf.function(lambda p, c, model=model: model.call_cached(p, c, 0, pad)[1],
                              autograph=False)
        cache = prefill(tf.constant(prompt), model.init_cache(1, length))
        step = decode_step(model, jit_compile=jit)
        if not jit:
            step = tf.function(step, autograph=False)

        def one(step=step, cache=cache):
            return float(tf.reduce_sum(step(token, cache, length - 1, pad)[0]))
        one()  # trace / compile
        out[key] = lambda one=one: min(time_calls(one, 5))
    return out


def decode_table(title: str, cfgs: dict, length: int, jit: bool, rounds: int) -> dict:
    """`decode_runners` taking turns for `rounds`: prints min / median / max ms/token per
    model under `title`; returns {name: median ms}."""
    ms = take_turns(decode_runners(cfgs, length, jit), rounds)
    rows = {k: [v * 1e3 for v in vals] for k, vals in ms.items()}
    print_stats(title, rows, "ms/token", "{:,.2f}")
    return {k: stats(v)[1] for k, v in rows.items()}


def take_turns(runners: dict, rounds: int) -> dict:
    """{name: [value per round]}: the runners take turns, round after round."""
    values = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            values[k].append(fn())
    return values


def flag_values(argv: list[str]):
    """Parsed trainer flags (absl), in a FlagValues of their own."""
    from absl import flags

    from deepseek_tf.flags import define_flags
    fv = flags.FlagValues()
    define_flags(flag_values=fv)
    fv(["bench", *argv])
    return fv


def preset_model(name: str, **overrides):
    """The ModelConfig of configs/`name`.flags, with `overrides` replaced."""
    from deepseek_tf.flags import experiment_from_flags
    fv = flag_values([f"--flagfile={os.path.join(ROOT, 'configs', name + '.flags')}"])
    return experiment_from_flags(fv).model.replace(**overrides)


def _model(cfg, precision: str, remat: str = "none"):
    import tensorflow as tf
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.train import precision as precision_lib
    tf.keras.utils.set_random_seed(0)
    with precision_lib.policy_scope(precision):
        return DeepSeekCausalLM(cfg, remat=remat)


def train_step_runner(cfg, batch: int, seq: int, jit: bool, precision: str = "float32",
                      it=None, remat: str = "none"):
    """A callable running one real optimizer step on a random batch (compiled on its
    first call); its `.out` is the last step's outputs."""
    import tensorflow as tf
    from deepseek_tf.config import OptimConfig, TrainConfig
    from deepseek_tf.train import precision as precision_lib
    from deepseek_tf.train.optimizer import make_optimizer
    from deepseek_tf.train.step import make_train_step
    model = _model(cfg, precision, remat)
    tcfg = TrainConfig(batch_size=batch, jit_compile=jit, precision=precision, remat=remat)
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
    import tensorflow as tf
    from deepseek_tf.train.step import make_grad_fn
    grad_fn = make_grad_fn(_model(cfg, precision), 1, jit)
    b = next(batches(batch, seq, cfg.vocab_size))
    denom = tf.constant(float(batch * seq))
    return lambda: float(grad_fn(b, denom)[1])


def update_runner(cfg, precision: str = "float32"):
    """A callable running the step's per-parameter part alone: global norm, clipping
    coefficient and the (fused AdamW) update, on fixed gradients."""
    import tensorflow as tf
    from deepseek_tf.config import OptimConfig
    from deepseek_tf.train.optimizer import make_optimizer
    from deepseek_tf.train.step import apply_scaled, make_finish_fn
    model = _model(cfg, precision)
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


def matmul_peak(n: int = 1024, repeats: int = 20, dtype: str = "float32") -> float:
    """Measured `dtype` matmul FLOP/s: the best of plain TF and XLA on n x n matmuls."""
    import tensorflow as tf
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    best = 0.0
    def matmul_sum(x, y):
        return tf.reduce_sum(tf.matmul(x, y))

    for jit in (False, True):
        f = tf.function(matmul_sum, jit_compile=jit)
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
    from deepseek_tf.config import DataConfig, Experiment, TrainConfig
    from deepseek_tf.train import autotune
    prec, why_p = autotune.resolve_precision(precision)
    exp = Experiment(model=cfg, data=DataConfig(seq_len=seq),
                     train=TrainConfig(batch_size=batch, precision=prec, jit_compile=jit_compile))
    jit, why_j = autotune.resolve_jit_compile(exp, _model(cfg, prec), log=lambda *_: None)
    return prec, jit == "true", f"precision {why_p}; jit_compile {why_j}"
