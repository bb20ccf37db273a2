"""Checkpoint restore with clear errors.

Saving goes through `tf.train.CheckpointManager`: TF writes the checkpoint's
files first and updates the `checkpoint` index file (atomically) last, so an
interrupted save leaves the previous checkpoint as the latest one.

A checkpoint written by `python -m deepseek_tf.convert` holds only the model and
the step (no optimizer, data or RNG state): it is restored as the initial weights
of a fresh run.
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.config import UserError


def restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
                   log=print) -> int:
    """Restores the newest checkpoint of `manager`, if any; returns its step (0 if none)."""
    path = manager.latest_checkpoint
    if not path:
        return 0
    weights_only = not any(name.startswith("optimizer/")
                           for name, _ in tf.train.list_variables(path))
    if weights_only:
        checkpoint = tf.train.Checkpoint(model=checkpoint.model, step=checkpoint.step)
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot restore checkpoint {path}: {first}. It does not match this "
                        f"model/config or is damaged: use a new --workdir, or delete that "
                        f"checkpoint to fall back to an older one.") from e
    step = int(checkpoint.step.numpy())
    if weights_only:
        log(f"initialised the model from {path} (weights only) at step {step}")
    else:
        log(f"resumed from {path} at step {step}")
    return step
