"""Every script in bench/ runs in `--smoke` mode (tiny sizes, one round, reference sides
included), exits cleanly, prints the machine line and its result lines, and keeps
TensorFlow's start-up lines off the console. All benches share one process
(tests/bench/smoke_runner.py: TensorFlow is imported once); their sides start their own."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench -> lines its smoke run must print (regular expressions, one line each).
RESULTS = {
    "train_throughput": [r"^no XLA +[\d,]+ +[\d,]+ +[\d,]+$", r"^XLA: MFU [\d.]+% \(median\)$"],
    "moe_scaling": [r"layer  sparse: E=4 .* ratio [\d.]+", r"model  train step: E=4 .* ratio [\d.]+"],
    "data_throughput": [r"^prepare \[.*documents/s", r"^pipeline / training: [\d.]+x"],
    "remat_memory": [r"^remat=block +peak step memory", r"^block / none: memory [\d.]+x"],
    "mwms_scaling": [r"^2 workers +[\d,]+", r"^speed-up 2 vs 1 worker: median [\d.]+x"],
    "edge": [r"^TFLite int8 \(ai-edge-litert\) +[\d,]+", r"^targets: int8 decode"],
    "compare_hf": [r"^transformers: torch .*, 2 threads$|^transformers: torch .* threads$",
                   r"^transformers bf16 autocast +[\d,]+ +[\d,]+ +[\d,]+$",
                   r"^deepseek_tf float32 \+XLA +[\d,]+",
                   r"^best medians: deepseek_tf [\d,]+ tokens/s \(.*\), transformers [\d,]+ "
                   r"tokens/s \(.*\): ratio [\d.]+x$", r"^the trainer's auto settings here: "],
    "dsa": [r"^ +128 +[\d.]+s +[\d.]+s +[\d.]+x",
            r"^sparse/dense fwd\+bwd at T=128: [\d.]+x; crossover: "],
    "serve_load": [r"^clients +requests/s +TTFT p50 ms +TTFT p99 ms +tokens/s$",
                   r"^16 +[\d,.]+ +[\d,.]+ +[\d,.]+ +[\d,.]+$",
                   r"^batching: 16 clients give [\d.]+x the tokens/s of 1$"],
    "distill": [r"^student \+ teacher +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
                r"^student alone +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
                r"^distillation: eval CE [\d.]+ vs [\d.]+ alone \([-+][\d.]+ nats/byte\) at 2 "
                r"steps; time [\d.]+x$"],
    "decode": [r"^hf pos 32 +-?[\d,.]+ +-?[\d,.]+ +-?[\d,.]+$",
               r"^saved_model_xla pos 8 ", r"^keras: transformers / ours decode time "
               r"\(ratio of medians\) at 8: -?[\d.]+x, at 32: -?[\d.]+x"],
}
# What TensorFlow prints at start-up unless TF_CPP_MIN_LOG_LEVEL silences it.
START_UP = ("cuInit", "cuda drivers", "cpu_feature_guard", "oneDNN custom operations",
            "XLA service", "StreamExecutor device")


def test_every_bench_script_is_smoke_tested():
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
    # common: the plumbing; hf_*: the transformers sides of compare_hf and decode;
    # convert_memory: its smoke run measures a child's peak RSS, in
    # tests/convert/test_convert_memory.py.
    assert scripts - {"common", "hf_train", "hf_decode", "convert_memory"} == set(RESULTS)


@pytest.fixture(scope="module")
def smoke():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the benches'
    proc = subprocess.run([sys.executable, "tests/bench/smoke_runner.py", *RESULTS], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(l[6:]) for l in proc.stdout.splitlines() if l.startswith("SMOKE ")]
    return {r["name"]: r for r in runs}, proc.stderr


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_smoke(smoke, name):
    runs, _ = smoke
    run = runs[name]
    assert run["ok"], run["error"][-3000:]
    lines = run["stdout"].splitlines()
    assert re.match(r"machine: .+, \d+ cores; flags: .+; load average [\d.]+", lines[0]), lines[0]
    for pattern in RESULTS[name]:
        assert any(re.search(pattern, l) for l in lines), (pattern, run["stdout"])


def test_no_tensorflow_start_up_lines(smoke):
    _, stderr = smoke
    assert not [s for s in START_UP if s in stderr], stderr[-3000:]
