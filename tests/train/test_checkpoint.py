"""RunCheckpoints: who writes where with several workers, and resuming with another count."""

import os

import pytest
import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.train.checkpoint import RunCheckpoints
from deepseek_tf.train.strategy import Role
from tests.helpers.checkpoints import tf_warnings

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


def _truncate(path):
    data = f"{path}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def _files(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(directory) for f in fs if f != "checkpoint"}


def test_a_corrupt_latest_checkpoint_is_kept_aside_and_the_previous_one_restored(tmp_path):
    objects = _objects()
    run = RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 2)
    for step in (1, 2, 3):
        objects["step"].assign(step)
        objects["w"].assign([float(step), 0.0])
        run.save(step)
    ckpts = tmp_path / "checkpoints"
    _truncate(str(ckpts / "ckpt-3"))
    corrupt = {k: v for k, v in _files(ckpts).items() if k.startswith("ckpt-3.")}

    objects, msgs = _objects(), []
    run = RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 2)
    assert run.restore(log=msgs.append) == 2 and objects["w"].numpy().tolist() == [2.0, 0.0]
    assert msgs[0].startswith("checkpoint ckpt-3 is corrupt (IndexError: Read less bytes "
                              "than requested); kept for inspection as ") and len(msgs) == 2
    for step in (3, 4, 5):  # a new ckpt-3, then keep-last-2 prunes: never the corrupt one
        objects["step"].assign(step)
        run.save(step)
    files = _files(ckpts)
    assert {k: files[f"corrupt/{k}"] for k in corrupt} == corrupt  # byte for byte
    assert [os.path.basename(p) for p in run.manager.checkpoints] == ["ckpt-4", "ckpt-5"]
    assert sorted(f for f in files if not f.startswith("corrupt/")) == [
        "ckpt-4.data-00000-of-00001", "ckpt-4.index", "ckpt-5.data-00000-of-00001",
        "ckpt-5.index"]

    # Corrupt again at the same step: kept next to the first one.
    _truncate(str(ckpts / "ckpt-5"))
    run = RunCheckpoints(str(tmp_path), _objects(), _iterator(), Role(), 2)
    assert run.restore(log=quiet) == 4
    assert os.path.exists(ckpts / "corrupt" / "ckpt-5.index")


def test_no_intact_checkpoint_is_one_error_and_nothing_is_moved(tmp_path):
    objects = _objects()
    run = RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 3)
    for step in (1, 2):
        objects["step"].assign(step)
        run.save(step)
    ckpts = tmp_path / "checkpoints"
    _truncate(str(ckpts / "ckpt-2"))
    os.remove(ckpts / "ckpt-1.data-00000-of-00001")
    before = {**_files(ckpts), "checkpoint": (ckpts / "checkpoint").read_bytes()}
    run = RunCheckpoints(str(tmp_path), _objects(), _iterator(), Role(), 3)
    with pytest.raises(UserError) as e:
        run.restore(log=quiet)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint in {ckpts}: ckpt-2 (")
    assert "; ckpt-1 (" in msg and "Nothing was deleted" in msg
    assert {**_files(ckpts), "checkpoint": (ckpts / "checkpoint").read_bytes()} == before


def test_a_read_that_fails_once_is_retried_not_quarantined_and_a_clean_resume_reads_once(
        tmp_path, monkeypatch):
    """ckpt-2's data file is cut short, then put back while the reader waits to retry
    (a storage hiccup): the run resumes from ckpt-2 and moves nothing. A checkpoint that
    stays damaged is still set aside after ATTEMPTS reads."""
    from deepseek_tf.train import ckpt_health
    objects = _objects()
    run = RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 3)
    for step in (1, 2):
        objects["step"].assign(step)
        objects["w"].assign([float(step), 0.0])
        run.save(step)
    ckpts = tmp_path / "checkpoints"
    reads, pauses = [], []
    real_read = ckpt_health._read_all
    monkeypatch.setattr(ckpt_health, "_read_all", lambda p: reads.append(p) or real_read(p))

    objects = _objects()  # an intact checkpoint: the restore alone reads it
    assert RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 3).restore(
        log=quiet) == 2 and reads == []

    data = ckpts / "ckpt-2.data-00000-of-00001"
    good = data.read_bytes()
    _truncate(str(ckpts / "ckpt-2"))
    monkeypatch.setattr(ckpt_health, "pause", lambda n: pauses.append(n) or
                        data.write_bytes(good))  # the storage recovers
    objects, msgs = _objects(), []
    assert RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 3).restore(
        log=msgs.append) == 2
    assert objects["w"].numpy().tolist() == [2.0, 0.0] and len(reads) == 2 and pauses == [1]
    assert not (ckpts / "corrupt").exists() and not any("corrupt" in m for m in msgs)

    _truncate(str(ckpts / "ckpt-2"))  # damaged for good: every read fails
    monkeypatch.setattr(ckpt_health, "pause", pauses.append)
    pauses.clear()
    objects, msgs = _objects(), []
    with tf_warnings() as warnings:
        assert RunCheckpoints(str(tmp_path), objects, _iterator(), Role(), 3).restore(
            log=msgs.append) == 1
    assert not [w for w in warnings if "deprecated" in w], warnings
    assert pauses == list(range(1, ckpt_health.ATTEMPTS))
    assert msgs[0].startswith("checkpoint ckpt-2 is corrupt (IndexError: Read less bytes")
    assert sorted(os.listdir(ckpts / "corrupt")) == ["ckpt-2.data-00000-of-00001",
                                                     "ckpt-2.index"]
    state = (ckpts / "checkpoint").read_text()  # the index file lists ckpt-1, relative
    assert 'model_checkpoint_path: "ckpt-1"' in state and "ckpt-2" not in state


def test_worker_objects_are_each_workers_own_and_sharding_is_recorded(tmp_path):
    """ZeRO's optimizer shards (`worker_objects`) go into each worker's own checkpoint,
    come back on resume and on a rollback (`restore_worker_objects`); the main checkpoint
    records the shard count, and a resume with another count is one error line."""
    def run(index, value, shards=2):
        shard = tf.Variable([value, value])
        objects = {**_objects(3), "optimizer": tf.train.Checkpoint(t=tf.Variable(0))}
        return shard, RunCheckpoints(str(tmp_path), objects, _iterator(),
                                     Role("worker", index, 2), 3,
                                     worker_objects={"optimizer_shard": shard}, shards=shards)

    saved = [run(i, float(i + 1)) for i in (0, 1)]
    for _, c in saved:
        c.save(3)
    for i, (shard, c) in enumerate(saved):
        shard.assign([9.0, 9.0])
        c.restore_worker_objects(3)
        assert shard.numpy().tolist() == [i + 1.0] * 2
    resumed = [run(i, 0.0) for i in (0, 1)]
    for i, (shard, c) in enumerate(resumed):
        assert c.restore(log=quiet) == 3
        assert shard.numpy().tolist() == [i + 1.0] * 2
    with pytest.raises(UserError, match=r"^checkpoint ckpt-3 holds AdamW state sharded over 2 "
                       r"workers \(--train.shard_optimizer or --model.expert_parallel\), and "
                       r"this run's is sharded over 3 workers: resume with the same number of "
                       r"workers"):
        run(0, 0.0, shards=3)[1].restore(log=quiet)
