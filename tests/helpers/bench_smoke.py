"""The benches' smoke runs, shared by tests/bench/test_smoke.py (benches that run in the
test's process) and tests/bench/test_smoke_sides.py (benches that start TensorFlow or
torch side processes): two files, so `pytest -n 2 --dist loadfile` runs them in parallel.
Each file runs its benches in one process (tests/bench/smoke_runner.py: TensorFlow is
imported once); their sides start their own."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench -> lines its smoke run must print (regular expressions, one line each).
RESULTS = {
    "train_throughput": [r"^float32 no XLA +[\d,]+ +[\d,]+ +[\d,]+$",
                         r"^mixed_bfloat16 XLA: MFU [\d.]+% of the bfloat16 peak, ",
                         r"^bfloat16 / float32 step, best modes: [\d.]+x$"],
    "moe_scaling": [r"layer  sparse: E=4 .* ratio [\d.]+", r"model  train step: E=4 .* ratio [\d.]+"],
    "data_throughput": [r"^prepare \[.*documents/s", r"^pipeline / training: [\d.]+x"],
    "remat_memory": [r"^remat=block +peak step memory", r"^block / none: memory [\d.]+x"],
    "mwms_scaling": [r"^2 workers +[\d,]+", r"^speed-up 2 vs 1 worker: median [\d.]+x"],
    "sharding": [r"^ 2 none +[\d.]+ +[\d.]+ +[\d.]+ +1\.000 +0\.600$",
                 r"^ 2 zero2 +[\d.]+ +[\d.]+ +[\d.]+ +0\.5\d\d +0\.600$",
                 r"^zero2 / none step time at W = 2: [\d.]+x",
                 r"^MoE: 4 routed experts .* replicated [\d,]+, expert parallel [\d,]+ "
                 r"\(0\.500x\); other weights",
                 r"^ 2 replicated +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +1\.000$",
                 r"^ 2 expert parallel +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +0\.[5-9]\d\d$",
                 r"^ 2 expert parallel \+ zero2 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +0\.5\d\d$",
                 r"^expert parallel / replicated tokens/s at W = 2: [\d.]+x",
                 r"^expert parallel \+ zero2 / replicated tokens/s at W = 2: [\d.]+x"],
    "edge": [r"^TFLite int8 \(ai-edge-litert\) +[\d,]+",
             r"^TFLite int8 \(LiteRT-LM engine\) +[\d,]+", r"^targets: int8 decode"],
    "compare_hf": [r"^transformers: torch .*, 2 threads$|^transformers: torch .* threads$",
                   r"^transformers bf16 autocast +[\d,]+ +[\d,]+ +[\d,]+$",
                   r"^transformers float32 \+ torch.compile +[\d,]+ +[\d,]+ +[\d,]+$",
                   r"^deepseek_tf float32 +[\d,]+",
                   r"^best medians: deepseek_tf [\d,]+ tokens/s \(.*\), transformers [\d,]+ "
                   r"tokens/s \(.*\): ratio [\d.]+x$", r"^the trainer's auto settings here: "],
    "dsa": [r"^ +128 +[\d.]+s +[\d.]+s +[\d.]+x",
            r"^sparse/dense fwd\+bwd at T=128: [\d.]+x; crossover: "],
    "serve_load": [r"^clients +requests/s +TTFT p50 ms +TTFT p99 ms +tokens/s$",
                   r"^16 +[\d,.]+ +[\d,.]+ +[\d,.]+ +[\d,.]+$",
                   r"^batching: 16 clients give [\d.]+x the tokens/s of 1$"],
    "distill": [r"^teacher T=1 a=0.5 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
                r"^student alone +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
                r"^distillation \(teacher T=[12] a=0.5\): eval CE [\d.]+ vs [\d.]+ alone "
                r"\([-+][\d.]+ nats/byte\) at 2 steps; time [\d.]+x$"],
    "v4": [r"^train 2x32 +min", r"^v4 \(float32, XLA off\) +[\d,]+",
           r"^train tokens/s V4 / V3: [\d.]+x$",
           r"^decode ms/token at T=64: V4 [\d.]+, V3 [\d.]+, V4 / V3 [\d.]+x$"],
    "grpo": [r"^ +3 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+ +[\d,]+$",
             r"^update \(s\) +[\d.]+ +[\d.]+ +[\d.]+$",
             r"^sampling \(s\) +[\d.]+ +[\d.]+ +[\d.]+$",
             r"^tokens/s +[\d,]+ +[\d,]+ +[\d,]+$",
             r"^rollout share of step time: \d+%; median generator [\d,]+ tokens/s$"],
    "quantize": [r"^mode +MiB +x fp32 +ms/token min/med/max +val loss +vs int4 +KL$",
                 r"^none +[\d.]+ +1\.00 +(-?[\d.]+/){2}-?[\d.]+ +[\d.]+ +0\.00e\+00$",
                 r"^int4 +[\d.]+ +0\.\d+ +(-?[\d.]+/){2}-?[\d.]+ +[\d.]+ +[\d.]+e-\d+$",
                 r"^awq +[\d.]+ +0\.\d+ +(-?[\d.]+/){2}-?[\d.]+ +[\d.]+ +[+-][\d.]+ \+- "
                 r"[\d.]+ +[\d.]+e-\d+$"],
    "moe_decode": [r"^E=8: top-2, expert width 96, ",
                   r"^decode at T=16 \(XLA off\) +min +median +max +ms/token",
                   r"^XLA off: E=8 / E=4 decode time [\d.]+x \(target <= 1.2\)$",
                   r"^XLA on: E=8 / E=4 decode time [\d.]+x \(target <= 1.2\)$"],
    "batch_decode": [r"^batch 2 +[\d,]+ +[\d,]+ +[\d,]+$",
                     r"^batch curve \(median / batch 1's\): 1: 1\.00x, 2: [\d.]+x$"],
    "decode": [r"^hf pos 32 +-?[\d,.]+ +-?[\d,.]+ +-?[\d,.]+$",
               r"^hf_compiled pos 32 +-?[\d,.]+ +-?[\d,.]+ +-?[\d,.]+$",
               r"^transformers' faster decode: at 8: hf(_compiled)?, at 32: hf(_compiled)?$",
               r"^saved_model_xla pos 8 ", r"^keras: transformers' best / ours decode time "
               r"\(ratio of medians\) at 8: -?[\d.]+x, at 32: -?[\d.]+x"],
}
# The benches whose smoke runs start TensorFlow or torch processes of their own.
SIDES = ("remat_memory", "mwms_scaling", "sharding", "compare_hf", "decode")
IN_PROCESS = tuple(sorted(set(RESULTS) - set(SIDES)))
# What TensorFlow prints at start-up unless TF_CPP_MIN_LOG_LEVEL silences it, and the
# absl log lines (XLA's) unless absl's own minimum level is raised too (`quiet_tensorflow`).
START_UP = ("cuInit", "cuda drivers", "cpu_feature_guard", "oneDNN custom operations",
            "XLA service", "StreamExecutor device", "Compiled cluster using XLA",
            "absl::InitializeLog")


def run_smoke(names) -> tuple[dict, str]:
    """({bench: its smoke_runner record}, the runner's stderr) of `names`, in one process."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the benches'
    proc = subprocess.run([sys.executable, "tests/bench/smoke_runner.py", *names], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(l[6:]) for l in proc.stdout.splitlines() if l.startswith("SMOKE ")]
    return {r["name"]: r for r in runs}, proc.stderr


def check_run(runs: dict, name: str) -> None:
    """The bench exited cleanly and printed the machine line and its result lines."""
    run = runs[name]
    assert run["ok"], run["error"][-3000:]
    lines = run["stdout"].splitlines()
    assert re.match(r"machine: .+, \d+ cores; flags: .+; load average [\d.]+", lines[0]), lines[0]
    for pattern in RESULTS[name]:
        assert any(re.search(pattern, l) for l in lines), (pattern, run["stdout"])


def check_start_up(stderr: str) -> None:
    """None of TensorFlow's start-up lines reached the console."""
    assert not [s for s in START_UP if s in stderr], stderr[-3000:]


def smoke_tests(names):
    """(smoke fixture, test_smoke, test_no_tensorflow_start_up_lines) of a test file that
    runs the benches `names` in one process (module-scoped: once per file).

        smoke, test_smoke, test_no_tensorflow_start_up_lines = smoke_tests(SIDES)
    """
    @pytest.fixture(scope="module")
    def smoke():
        return run_smoke(names)

    @pytest.mark.parametrize("name", names)
    def test_smoke(smoke, name):
        check_run(smoke[0], name)

    def test_no_tensorflow_start_up_lines(smoke):
        check_start_up(smoke[1])

    return smoke, test_smoke, test_no_tensorflow_start_up_lines
