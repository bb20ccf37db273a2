"""RunCheckpoints: who writes where with several workers, and resuming with another count."""

import os

import pytest
import tensorflow as tf

from deepseek_tf.config import UserError
from deepseek_tf.train.checkpoint import RunCheckpoints
from deepseek_tf.train.strategy import Role

quiet = lambda *_: None  # noqa: E731


def _objects(step=0):
    return {"step": tf.Variable(step, dtype=tf.int64), "w": tf.Variable([1.0, 2.0])}


def _iterator():
    return iter(tf.data.Dataset.range(100))


def test_chief_writes_the_checkpoint_others_a_temporary_copy_and_their_data_position(tmp_path):
    calls = []
    chief = RunCheckpoints(str(tmp_path), _objects(5), _iterator(), Role("worker", 0, 2), 3,
                           barrier=lambda: calls.append("barrier"))
    other_it = _iterator()
    next(other_it), next(other_it)
    other = RunCheckpoints(str(tmp_path), _objects(5), other_it, Role("worker", 1, 2), 3)
    for c in (chief, other):
        c.save(5)
        c.save(5)  # the same step twice is saved once
    assert calls == ["barrier"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "checkpoint", "ckpt-5.data-00000-of-00001", "ckpt-5.index", "data-worker-0",
        "data-worker-1"]
    tmp = other.writer.directory
    assert tf.train.latest_checkpoint(tmp).endswith("ckpt-5") and not tmp.startswith(
        str(tmp_path))
    other.close()
    assert not os.path.exists(tmp)

    # Worker 1 resumes from the chief's checkpoint and its own data position.
    it = _iterator()
    resumed = RunCheckpoints(str(tmp_path), _objects(), it, Role("worker", 1, 2), 3)
    assert resumed.restore(log=quiet) == 5
    assert int(next(it)) == 2


def test_resuming_with_another_number_of_workers_is_one_clear_error(tmp_path):
    single = RunCheckpoints(str(tmp_path), _objects(7), _iterator(), Role(), 3)
    single.save(7)
    two = RunCheckpoints(str(tmp_path), _objects(), _iterator(), Role("worker", 0, 2), 3)
    with pytest.raises(UserError, match="another number of workers"):
        two.restore(log=quiet)
