"""Resuming past a corrupt checkpoint (a truncated .data file), end to end."""

import os
import shutil

import numpy as np

from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import checkpoint_tensors
from tests.train.test_cli import _error_lines, run

quiet = lambda *_: None  # noqa: E731


def _truncate(path):
    data = f"{path}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def _exp(data_dir, steps):
    return tiny.experiment(data_dir, optim={"decay_steps": 12}, train={
        "steps": steps, "log_every": 1, "checkpoint_every": 4, "eval_every": 0})


def test_truncated_latest_checkpoint_resumes_from_the_previous_one_bitwise(stdlib_data,
                                                                           tmp_path):
    _, data_dir, _ = stdlib_data
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(_exp(data_dir, 8), a, log=quiet)            # ckpt-4, ckpt-8
    _truncate(os.path.join(a, "checkpoints", "ckpt-8"))
    msgs = []
    train(_exp(data_dir, 12), a, log=msgs.append)     # resumes from ckpt-4
    assert any(m.startswith("checkpoint ckpt-8 is corrupt (IndexError: Read less bytes")
               for m in msgs), msgs
    assert any(m.startswith("resumed from") and m.endswith("ckpt-4 at step 4") for m in msgs)

    train(_exp(data_dir, 4), b, log=quiet)            # the run that resumed from ckpt-4
    train(_exp(data_dir, 12), b, log=quiet)
    wa, wb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    losses = [[(r["step"], r["loss"]) for r in read_log(d) if r["kind"] == "train"]
              for d in (a, b)]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 13))
    kept = sorted(os.listdir(os.path.join(a, "checkpoints", "corrupt")))
    assert kept == ["ckpt-8.data-00000-of-00001", "ckpt-8.index"]


def test_cli_with_every_checkpoint_corrupt_exits_2_in_one_line_and_deletes_nothing(
        stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    wd = str(tmp_path / "run")
    train(_exp(data_dir, 8), wd, log=quiet)
    ckpts = os.path.join(wd, "checkpoints")
    for step in (4, 8):
        _truncate(os.path.join(ckpts, f"ckpt-{step}"))
    before = {f: open(os.path.join(ckpts, f), "rb").read() for f in os.listdir(ckpts)}
    shutil.copy(os.path.join(wd, "log.jsonl"), tmp_path / "log.before")
    proc = run("deepseek_tf.train", f"--workdir={wd}", "--train.steps=12")
    errors = _error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: no intact checkpoint in {ckpts}: ckpt-8 (IndexError")
    assert "Traceback" not in proc.stderr
    assert {f: open(os.path.join(ckpts, f), "rb").read() for f in os.listdir(ckpts)} == before
    assert open(os.path.join(wd, "log.jsonl"), "rb").read() == (tmp_path / "log.before").read_bytes()
