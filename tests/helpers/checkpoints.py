"""Reading checkpoints back in tests."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil

import numpy as np
import tensorflow as tf


def checkpoint_tensors(workdir_or_path: str, prefixes=("model/", "optimizer/")) -> dict:
    """{key: array} of a checkpoint (a workdir's latest one, or a checkpoint path)."""
    path = workdir_or_path
    if os.path.isdir(path):
        path = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in sorted(reader.get_variable_to_shape_map())
            if k.startswith(prefixes)}


def assert_worker_states_equal(workdir: str, reference: str, workers: int, step: int) -> None:
    """Each worker's own checkpoint of `step` (its experts, their moments, its ZeRO shard)
    in `workdir` equals `reference`'s bitwise."""
    for w in range(workers):
        path = f"checkpoints/data-worker-{w}/ckpt-{step}"
        a, b = (checkpoint_tensors(os.path.join(d, path), ("experts/", "optimizer_shard/"))
                for d in (reference, workdir))
        assert a.keys() == b.keys() and len(a) > 2
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def assert_clipped_runs_equal(workdir: str, reference: str, steps: int, tol: float,
                              clipped: int, clip_norm: float = 0.5) -> None:
    """`assert_runs_equal` within `tol`, the logged gradient norms too (relatively), and
    clipping engaged in at least `clipped` of the reference's steps."""
    from deepseek_tf.train.logger import read_log

    norms = [[r["grad_norm"] for r in read_log(d) if r["kind"] == "train"]
             for d in (reference, workdir)]
    assert sum(n > clip_norm for n in norms[0]) >= clipped, norms
    np.testing.assert_allclose(norms[1], norms[0], rtol=tol)
    assert_runs_equal(workdir, reference, steps, atol=tol)


def all_checkpoints(workdir: str) -> list[str]:
    """Every checkpoint path of a workdir (main and per-worker data directories)."""
    out = []
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        out += [os.path.join(root, f[:-len(".index")]) for f in files if f.endswith(".index")]
    return sorted(out)


def rewind(workdir: str, dst: str, step: int) -> str:
    """A copy of `workdir` at `dst` as the run would have left it had it stopped after
    `step` (it must have kept that step's checkpoint): the later checkpoints are gone.
    Resuming the copy and comparing it with the straight run tests a resume at `step`
    without training a separate run up to `step`. Returns `dst`."""
    from deepseek_tf.train import ckpt_health

    shutil.copytree(workdir, dst)
    directory = os.path.join(dst, "checkpoints")
    later = [p for p in tf.train.get_checkpoint_state(directory).all_model_checkpoint_paths
             if int(p.rsplit("-", 1)[1]) > step]
    for p in later:
        for f in glob.glob(os.path.join(directory, os.path.basename(p)) + ".*"):
            os.remove(f)
    ckpt_health.forget(directory, later)
    assert tf.train.latest_checkpoint(directory).endswith(f"ckpt-{step}"), os.listdir(directory)
    return dst


def nonfinite_tensors(path: str) -> list[str]:
    """Keys of float tensors in checkpoint `path` that hold an inf or NaN."""
    reader = tf.train.load_checkpoint(path)
    bad = []
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating and not np.all(np.isfinite(reader.get_tensor(key))):
            bad.append(key)
    return bad


@contextlib.contextmanager
def tf_warnings():
    """Collects the messages TF logs (its `tensorflow` logger, after its filters)."""
    import logging
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def assert_resume_refused(workdir: str, dst: str, match: str) -> None:
    """A copy of run `workdir` at `dst`, resumed by this one process with its own config,
    is refused with a UserError matching `match`, and its checkpoints are left alone."""
    import pytest

    from deepseek_tf.errors import UserError
    from deepseek_tf.train.loop import train
    from deepseek_tf.workdir import load_experiment

    shutil.copytree(workdir, dst)
    before = sorted(os.listdir(os.path.join(dst, "checkpoints")))
    with pytest.raises(UserError, match=match):
        train(load_experiment(dst), dst, log=lambda *_: None)
    assert sorted(os.listdir(os.path.join(dst, "checkpoints"))) == before


def run_weights(workdir: str) -> dict:
    """{weight path without the model's name: array} of a workdir (`load_workdir`: an
    expert-parallel run's experts gathered)."""
    from deepseek_tf.workdir import load_workdir

    model, _ = load_workdir(workdir)
    return {v.path.split("/", 1)[-1]: v.numpy() for v in model.weights}


def train_losses(workdir: str) -> list[float]:
    """The logged loss of every train step of a workdir."""
    from deepseek_tf.train.logger import read_log

    return [r["loss"] for r in read_log(workdir) if r["kind"] == "train"]


def assert_runs_equal(workdir: str, reference: str, steps: int, atol: float) -> None:
    """`workdir` trained `steps` steps with `reference`'s losses and final weights, within
    `atol`."""
    np.testing.assert_allclose(train_losses(workdir), train_losses(reference), rtol=0,
                               atol=atol)
    assert len(train_losses(workdir)) == steps
    a, b = run_weights(reference), run_weights(workdir)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=atol, err_msg=k)
