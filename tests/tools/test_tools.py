"""deepseek_tf.tools: merge a LoRA adapter, compare runs, inspect a checkpoint, summarise a
profile (in-process + --help; the profile summary of a real trace is tested with
--train.profile_steps in tests/train/test_autotune.py)."""

import dataclasses
import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment, LoraConfig
from deepseek_tf.errors import UserError
from deepseek_tf.lora import apply_lora, save_adapter
from deepseek_tf.workdir import load_workdir
from tests.helpers.workdirs import make_workdir
from deepseek_tf.tools import compare_runs, inspect_checkpoint, merge_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
quiet = lambda *_: None  # noqa: E731
NS = "{http://www.w3.org/2000/svg}"
IDS = tf.constant([[256, 7, 8, 9, 10]])


@pytest.mark.parametrize("tool", ["merge_lora", "compare_runs", "inspect_checkpoint",
                                  "inspect_hf_checkpoint",
                                  "profile_summary"])
def test_help_and_missing_flag(tool):
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", f"deepseek_tf.tools.{tool}", *a], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    out = run("--help")
    assert out.returncode == 0 and "--" in out.stdout
    out = run()
    assert out.returncode == 2 and out.stderr.strip().startswith("error:")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A workdir saved as a LoRA run (random non-zero adapters) and its model."""
    path, model = make_workdir(str(tmp_path_factory.mktemp("lora")), "gqa", seed=2)
    exp = Experiment.load(os.path.join(path, "config.json"))
    lora = LoraConfig(rank=2, targets="q_proj,down_proj")
    exp = dataclasses.replace(exp, lora=lora, train=exp.train.replace(finetuning_type="lora"))
    exp.save(os.path.join(path, "config.json"))
    apply_lora(model, lora)
    for v in model.trainable_variables:
        v.assign(tf.random.stateless_normal(v.shape, [3, 4]) * 0.1)
    # With an optimizer, as training saves: TF stores trainable variables under its path.
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=opt, step=tf.Variable(1, tf.int64)),
        os.path.join(path, "checkpoints"), max_to_keep=2).save(1)
    save_adapter(model, path, lora)
    return path, model


def test_merge_lora_workdir_and_adapter_forms(lora_run, tmp_path):
    path, model = lora_run
    want = model(IDS).numpy()
    out = merge_lora.merge(str(tmp_path / "m1"), workdir=path, log=quiet)
    merged, exp = load_workdir(out)
    assert exp.train.finetuning_type == "full"
    assert not any("lora" in v.path for v in merged.variables)
    np.testing.assert_allclose(merged(IDS).numpy(), want, atol=1e-5)
    # The same adapter applied to the base weights (a plain copy of the run's base).
    base = str(tmp_path / "base")
    make_workdir(base, "gqa", seed=2)
    out2 = merge_lora.merge(str(tmp_path / "m2"), base=base,
                            adapter=os.path.join(path, "adapter"), log=quiet)
    np.testing.assert_allclose(load_workdir(out2)[0](IDS).numpy(), want, atol=1e-5)
    with pytest.raises(UserError, match="not a LoRA run"):
        merge_lora.merge(str(tmp_path / "m3"), workdir=base, log=quiet)
    with pytest.raises(UserError, match="exists"):
        merge_lora.merge(out, workdir=path, log=quiet)


def test_compare_runs_draws_every_run(tmp_path):
    dirs = []
    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "kind": "train", "loss": scale / s} for s in range(1, 6)]
        rows.append({"step": 5, "kind": "eval", "loss": scale / 4})
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    lines = []
    svg = ElementTree.parse(compare_runs.compare(dirs, str(tmp_path / "cmp.svg"),
                                                 log=lines.append)).getroot()
    # Per run: its train curve (a 5-point line) and its eval point (a dot), one colour.
    lines_drawn = svg.findall(f"{NS}polyline")
    assert [len(l.get("points").split()) for l in lines_drawn] == [5, 5]
    dots = svg.findall(f"{NS}circle")
    assert [d.get("fill") for d in dots] == [l.get("stroke") for l in lines_drawn]
    assert any(line.startswith("b") and "eval" in line and "0.5000" in line for line in lines)
    with pytest.raises(UserError, match="no 'nope' values"):
        compare_runs.compare(dirs, str(tmp_path / "x.svg"), metric="nope", log=quiet)
    with pytest.raises(UserError, match=r"name it \*\.svg"):
        compare_runs.compare(dirs, str(tmp_path / "x.png"), log=quiet)


def test_inspect_checkpoint_lists_model_and_adapter_variables(lora_run):
    path, model = lora_run
    rows = inspect_checkpoint.inspect(path, stats=True)
    names = {r["name"] for r in rows}
    assert "model/embed_tokens/_embeddings" in names
    lora = inspect_checkpoint.inspect(path, contains="lora_kernel")
    assert len(lora) == 8 and all(r["dtype"] == "float32" for r in lora)
    q = next(r for r in rows if r["name"] == "model/layers_0/self_attn/q_proj/lora_kernel_a")
    v = model.blocks[0].self_attn.q_proj.lora_kernel_a.numpy()
    assert q["shape"] == list(v.shape) and q["mean"] == pytest.approx(float(v.mean()), abs=1e-6)
    with pytest.raises(UserError, match="no checkpoint there"):
        inspect_checkpoint.inspect(os.path.join(path, "nowhere"))


def test_profile_summary_of_a_run_without_a_trace_says_how_to_make_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepseek_tf.tools.profile_summary",
                          f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--train.profile_steps" in out.stderr.strip().splitlines()[-1]
