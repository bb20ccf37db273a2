"""Recovery from non-finite / exploding steps (train/recovery.py) in a float32 run."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.train import loop
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import all_checkpoints, nonfinite_tensors
from tests.helpers.nan_train import nan_once_at
from tests.train.test_cli import _error_lines, run

quiet = lambda *_: None  # noqa: E731


def _nan_once_at(monkeypatch, k: int):
    """Makes the gradients NaN at the k-th optimizer step, once."""
    monkeypatch.setattr(loop, "make_train_step", nan_once_at(loop.make_train_step, k))


def test_nan_at_step_k_rolls_back_skips_the_batches_and_completes(stdlib_data, tmp_path,
                                                                    monkeypatch, capsys):
    _, data_dir, _ = stdlib_data
    _nan_once_at(monkeypatch, 6)
    exp = tiny.experiment(data_dir, train={"steps": 12, "log_every": 1, "checkpoint_every": 4,
                                           "keep_checkpoints": 10, "eval_every": 0})
    result = train(exp, str(tmp_path), log=quiet)
    assert result["step"] == 12 and np.isfinite(result["eval"]["loss"])
    assert "recovery 1/3: gradients became non-finite at step 6; rolled back to ckpt-4, " \
           "skipping the 2 batches since\n" in capsys.readouterr().out
    rows = read_log(str(tmp_path))
    events = [r for r in rows if r["kind"] == "recovery"]
    assert len(events) == 1 and events[0]["step"] == 4  # the step it restored
    assert {k: events[0][k] for k in ("trial", "bad_step", "skipped_batches")} == {
        "trial": 1, "bad_step": 6, "skipped_batches": 2}
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # the rolled-back steps 5, 6 are logged once
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    paths = all_checkpoints(str(tmp_path))
    assert [p.rsplit("-", 1)[1] for p in paths] == ["12", "4", "8"]
    for path in paths:
        assert not nonfinite_tensors(path), path
    assert any("recovery" in f for f in tf.io.gfile.listdir(str(tmp_path / "tensorboard")))


def test_trials_exhausted_exits_nonzero_with_one_line(stdlib_data, tmp_path):
    """Every step above a tiny --train.loss_upper_bound: two rollbacks, then one error."""
    _, data_dir, _ = stdlib_data
    wd = str(tmp_path / "run")
    exp = tiny.experiment(data_dir, train={"steps": 2, "checkpoint_every": 2, "eval_every": 0})
    train(exp, wd, log=quiet)
    proc = run("deepseek_tf.train", f"--workdir={wd}", "--train.steps=6",
               "--train.loss_upper_bound=0.01", "--train.recovery_max_trials=2")
    errors = _error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "exceeds --train.loss_upper_bound=0.01 at step 3, after 2 recoveries " \
           "(--train.recovery_max_trials=2)" in errors[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("recovery ") == 2
    assert [p.rsplit("-", 1)[1] for p in all_checkpoints(wd)] == ["2"]
    assert [r["trial"] for r in read_log(wd) if r["kind"] == "recovery"] == [1, 2]


def test_recovery_flags_are_validated():
    with pytest.raises(ConfigError, match="recovery_max_trials must be >= 0"):
        TrainConfig(recovery_max_trials=-1)
    with pytest.raises(ConfigError, match="loss_upper_bound must be >= 0"):
        TrainConfig(loss_upper_bound=-1.0)
    assert TrainConfig().recovery_max_trials == 3 and TrainConfig().loss_upper_bound == 0.0


def test_a_bad_step_before_any_checkpoint_is_one_error(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={"steps": 4, "loss_upper_bound": 0.01})
    with pytest.raises(UserError, match="before this run saved a checkpoint to roll back to"):
        train(exp, str(tmp_path), log=quiet)
