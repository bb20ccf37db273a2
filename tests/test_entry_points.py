"""Every entry point as a user runs it prints no TensorFlow log noise: the start-up block
(cuInit, oneDNN, cpu_feature_guard), grappler / XLA lines (W0000 op_level_cost_estimator,
I0000 Compiled cluster) or the TFLite converter's chatter, for --help and a tiny real
command. The environment has no TF_CPP_MIN_LOG_LEVEL: each entry point sets it itself."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"cuInit|oneDNN|cpu_feature_guard|W0000|I0000|op_level_cost_estimator|"
                   r"This TensorFlow binary is optimized|absl::InitializeLog|Ignored output_format|"
                   r"MLIR V1 optimization pass|Compiled cluster|cuda_platform")
MODULES = ["train", "generate", "evaluate", "export", "convert", "params", "prepare", "launch",
           "data.demo", "serve"]
TOOLS = ["merge_lora", "compare_runs", "inspect_checkpoint", "inspect_hf_checkpoint",
         "profile_summary"]


def _run(args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not noise, (args, noise[:5])
    return proc


@pytest.mark.parametrize("entry", MODULES + TOOLS)
def test_help_is_quiet(entry):
    package = "deepseek_tf" if entry in MODULES else "deepseek_tf.tools"
    args = ["-m", f"{package}.{entry}"]
    proc = _run(args + ["--help"])
    assert proc.returncode == 0, proc.stderr[-1000:]
    if entry == "export":  # --output is a file for the edge formats
        assert "a file for tflite and litertlm" in " ".join(proc.stdout.split())
    if entry in ("generate", "evaluate", "export", "serve"):  # one --jit_compile type everywhere
        assert "<auto|true|false>" in proc.stdout


def test_every_tool_is_listed():
    """A new module in deepseek_tf/tools is a user command: it joins TOOLS (and so the
    --help check above)."""
    tools = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "deepseek_tf", "tools"))
                   if f.endswith(".py") and f != "__init__.py")
    assert tools == sorted(TOOLS)


def test_the_library_prepare_module_points_to_the_command():
    """`python -m deepseek_tf.data.prepare` (the library behind `deepseek_tf.prepare`) says
    which command to run and fails, instead of exiting 0 having done nothing."""
    proc = _run(["-m", "deepseek_tf.data.prepare", "--data.inputs=x"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "`python -m deepseek_tf.prepare`" in proc.stderr and not proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("quiet") / "run"))[0]


def test_real_commands_are_quiet(workdir, tmp_path):
    text = tmp_path / "eval.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(4)))
    out = tmp_path / "tiny.tflite"
    commands = [
        ["-m", "deepseek_tf.generate", f"--workdir={workdir}", "--prompt=Hi",
         "--max_new_tokens=4", "--jit_compile=auto"],  # XLA + grappler: the W0000 lines
        ["-m", "deepseek_tf.export", f"--workdir={workdir}", "--format=tflite",
         f"--output={out}", "--max_length=32", "--prefill_lengths=8"],
        ["-m", "deepseek_tf.evaluate", f"--workdir={workdir}", f"--data.inputs={text}",
         "--task=lm", f"--output={tmp_path / 'eval.json'}"],
        ["-m", "deepseek_tf.params", "--flagfile=configs/tiny.flags"],
        ["-m", "deepseek_tf.data.demo", f"--output_dir={tmp_path / 'demo'}", "--num_train=4",
         "--num_heldout=2"],
        ["-m", "deepseek_tf.tools.inspect_checkpoint", f"--checkpoint={workdir}"],
    ]
    for args in commands:
        proc = _run(args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        if "--format=tflite" in args:  # only what the user keeps is named
            assert str(out) in proc.stdout + proc.stderr
            assert "/tmp" not in (proc.stdout + proc.stderr).replace(str(tmp_path), "")
