"""Reading checkpoints back in tests."""

from __future__ import annotations

import contextlib
import os

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


def all_checkpoints(workdir: str) -> list[str]:
    """Every checkpoint path of a workdir (main and per-worker data directories)."""
    out = []
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        out += [os.path.join(root, f[:-len(".index")]) for f in files if f.endswith(".index")]
    return sorted(out)


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
