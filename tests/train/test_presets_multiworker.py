"""The presets as shipped, trained by 2 MultiWorkerMirroredStrategy workers through the
launcher, and a MirroredStrategy run with the presets' `auto` settings.

Every preset says `--train.jit_compile=auto` (and most `--train.precision=auto`): the
trainer times the step's forward+backward with and without XLA *inside the strategy*
(mirrored variables can only be read in a replica context) on every worker, and the
chief's choice is broadcast. These tests keep each preset's flagfile and override only
the run length and batch shape (2 steps of 2 x 64 tokens), so they run the path users
run: the preset's model family (GQA; MLA + MoE + MTP; V3.2's DSA; V4; LoRA on a base; a
distilled student), its auto settings, and the launcher.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.launcher import ENV, ROOT, Launcher

TIMEOUT = 1200  # a hang guard: one 2-worker run takes 1-3 min on a quiet 2-core machine
SHORT = ["--train.steps=2", "--train.batch_size=2", "--data.seq_len=64", "--train.log_every=1",
         "--train.eval_every=2", "--train.eval_steps=1", "--train.checkpoint_every=2"]


def _launch(preset, workdir, *flags):
    launcher = Launcher("--num_workers=2", f"--timeout={TIMEOUT}", "--",
                        f"--flagfile={os.path.join(ROOT, 'configs', preset)}",
                        f"--workdir={workdir}", *SHORT, *flags)
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    return output


def _check_resolved(workdir, output, precision_auto=True, warm=True):
    """config.json holds the resolved choices (once), and both workers took the chief's;
    with `warm` (the train step reuses the timed grad function), both workers traced and
    compiled it both ways before the chief timed alone."""
    with open(os.path.join(workdir, "config.json")) as f:
        train_cfg = json.load(f)["train"]
    assert train_cfg["jit_compile"] in ("true", "false"), train_cfg
    assert "jit_compile: auto -> " + train_cfg["jit_compile"] in train_cfg["auto_decisions"]
    if precision_auto:
        assert train_cfg["precision"] in ("float32", "mixed_bfloat16"), train_cfg
        assert "precision: auto -> " + train_cfg["precision"] in train_cfg["auto_decisions"]
    for w in (0, 1):
        assert re.search(rf"^\[worker {w}\] jit_compile: auto -> {train_cfg['jit_compile']}",
                         output, re.M), output[-4000:]
        assert re.search(rf"^\[worker {w}\] (stage \w+; )?strategy: MultiWorkerMirroredStrategy, "
                         rf"2 replicas.*"
                         rf"precision {train_cfg['precision']}; XLA {train_cfg['jit_compile']}",
                         output, re.M), output[-4000:]
        assert bool(re.search(rf"^\[worker {w}\] jit_compile=auto: tracing and compiling",
                              output, re.M)) == warm, output[-4000:]
    assert len(re.findall(r"^\[worker \d\] jit_compile=auto: timing", output, re.M)) == 1
    shas = [re.findall(rf"^\[worker {w}\] weights sha256: (\w+)$", output, re.M) for w in (0, 1)]
    assert len(shas[0]) == 1 and shas[0] == shas[1], output[-4000:]
    return train_cfg


@pytest.fixture(scope="module")
def tiny_run(stdlib_data, tmp_path_factory):
    """configs/tiny.flags on 2 workers (the base of the LoRA preset below)."""
    _, data_dir, _ = stdlib_data
    workdir = str(tmp_path_factory.mktemp("mw-tiny") / "run")
    output = _launch("tiny.flags", workdir, f"--data.data_dir={data_dir}")
    return workdir, output


def test_tiny_preset_on_two_workers(tiny_run):
    workdir, output = tiny_run
    _check_resolved(workdir, output)


@pytest.mark.parametrize("preset,needle", [
    # MLA + 8 routed experts (capacity 1.25) + MTP, with its auto settings.
    ("deepseek-v3-tiny.flags", r"\| mtp .*moe max/mean load"),
    # V3.2: the same + DSA in its sparse stage (the indexer KL as its own loss).
    ("deepseek-v32-tiny.flags", r"\| mtp .*\| indexer kl \d"),
    # V4: sliding / CSA (+ indexer KL) / HCA attention, hyper-connections, hash-routed
    # then top-2 MoE, MTP over the streams.
    ("deepseek-v4-tiny.flags", r"\| mtp .*\| indexer kl \d"),
])
def test_deepseek_tiny_presets_on_two_workers(stdlib_data, tmp_path, preset, needle):
    _, data_dir, _ = stdlib_data
    workdir = str(tmp_path / "run")
    output = _launch(preset, workdir, f"--data.data_dir={data_dir}")
    _check_resolved(workdir, output)
    assert re.search(rf"^\[worker 0\] step +2/2 \| loss .*{needle}", output,
                     re.M), output[-4000:]


def test_sft_lora_tiny_preset_on_two_workers(tiny_run, tmp_path):
    """LoRA on the 2-worker tiny run, on the demo's instructions (its own data prepared by
    the chief while the other worker waits)."""
    base, _ = tiny_run
    demo = str(tmp_path / "sft-demo")
    subprocess.run([sys.executable, "-m", "deepseek_tf.data.demo", f"--output_dir={demo}",
                    "--num_train=200", "--num_heldout=10"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=120)
    workdir = str(tmp_path / "run")
    output = _launch("sft-lora-tiny.flags", workdir, f"--train.init_from={base}",
                     f"--data.inputs={os.path.join(demo, 'train.jsonl')}", "--data.val_size=10")
    train_cfg = _check_resolved(workdir, output, precision_auto=False)
    assert train_cfg["finetuning_type"] == "lora"
    assert os.path.exists(os.path.join(workdir, "adapter", "adapter_config.json"))


def test_mirrored_strategy_with_auto_settings(stdlib_data, tmp_path):
    """Two in-process replicas (MirroredStrategy over 2 logical CPUs) with precision and
    jit_compile `auto`: the choices are made inside the strategy and saved resolved."""
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={"strategy": "mirrored", "jit_compile": "auto",
                                           "precision": "auto", "steps": 2, "batch_size": 2,
                                           "eval_every": 2, "checkpoint_every": 2})
    workdir = str(tmp_path / "run")
    lines = []
    result = train(exp, workdir, log=lines.append)
    assert result["step"] == 2
    with open(os.path.join(workdir, "config.json")) as f:
        train_cfg = json.load(f)["train"]
    assert train_cfg["jit_compile"] in ("true", "false")
    assert train_cfg["precision"] in ("float32", "mixed_bfloat16")
    assert "jit_compile: auto" in train_cfg["auto_decisions"]
    assert "precision: auto" in train_cfg["auto_decisions"]
    assert any("MirroredStrategy, 2 replicas" in line for line in lines), lines


def test_distill_tiny_preset_on_two_workers(tiny_run, tmp_path):
    """configs/distill-tiny.flags as shipped, its teacher the 2-worker tiny run (as the
    README's `make train` then distill): the teacher is built under the strategy on every
    worker, and both workers end with the same student."""
    teacher, _ = tiny_run
    workdir = str(tmp_path / "run")
    output = _launch("distill-tiny.flags", workdir, f"--distill.teacher={teacher}")
    _check_resolved(workdir, output, warm=False)  # the timing's token loss is not its own
    rows = [r for r in read_log(workdir) if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["kl_forward"] > 0 and r["lm_loss"] > 0 for r in rows), rows
