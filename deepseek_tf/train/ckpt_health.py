"""Which checkpoints of a run read back completely, and what happens to the others.

A checkpoint is intact when every tensor of it reads back (TF checks each tensor's
crc32c), so a `.data` file cut short by a full disk or a killed copy, or a flipped
byte, shows here instead of as a traceback half-way through a restore.

Resuming takes the newest intact checkpoint. Each corrupt newer one is reported in
one line and moved, byte for byte, into `checkpoints/corrupt/` (the chief does
this): there no `CheckpointManager` deletes it (keep-last-N) and no later save of
the same step overwrites it. If no checkpoint is intact nothing is moved.

Example:
    >>> path, bad = newest_intact(["/run/checkpoints/ckpt-8", "/run/checkpoints/ckpt-4"])
    >>> bad
    [('/run/checkpoints/ckpt-8', 'IndexError: Read less bytes than requested')]
"""

from __future__ import annotations

import glob
import os

import tensorflow as tf

from deepseek_tf.errors import UserError

CORRUPT_DIR = "corrupt"


def unreadable_reason(path: str) -> str | None:
    """None if every tensor of checkpoint `path` reads back, else why not (one line).

    Args:
      path: a checkpoint prefix (`.../ckpt-8`).
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for key, dtype in reader.get_variable_to_dtype_map().items():
            if dtype == tf.variant:  # e.g. a tf.data iterator's state: no numpy form
                tf.raw_ops.RestoreV2(prefix=path, tensor_names=[key], shape_and_slices=[""],
                                     dtypes=[dtype])
            else:
                reader.get_tensor(key)
    except Exception as e:  # noqa: BLE001 -- any failure to read back means "corrupt"
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else 'unreadable'}"
    return None


def newest_intact(paths: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest intact path or None, [(path, reason)] of the corrupt newer ones).

    Args:
      paths: checkpoint prefixes, newest first.
    """
    bad = []
    for path in paths:
        reason = unreadable_reason(path)
        if reason is None:
            return path, bad
        bad.append((path, reason))
    return None, bad


def _free_target(directory: str, name: str) -> str:
    target, n = os.path.join(directory, name), 1
    while glob.glob(target + ".*"):  # ckpt-8 was corrupt before: ckpt-8.2, ckpt-8.3 ...
        n += 1
        target = os.path.join(directory, f"{name}.{n}")
    return target


def quarantine(path: str) -> str:
    """Moves checkpoint `path`'s files into `<its directory>/corrupt/`; returns the
    new prefix (readable there with `tf.train.load_checkpoint`)."""
    directory = os.path.join(os.path.dirname(path), CORRUPT_DIR)
    os.makedirs(directory, exist_ok=True)
    target = _free_target(directory, os.path.basename(path))
    for f in sorted(glob.glob(glob.escape(path) + ".*")):
        os.rename(f, target + f[len(path):])
    return target


def forget(directory: str, paths: list[str]) -> None:
    """Removes `paths` from `directory`'s `checkpoint` index file (the list a
    CheckpointManager reads on construction and prunes by keep-last-N)."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return
    gone = {os.path.basename(p) for p in paths}
    kept = [(p, t) for p, t in zip(state.all_model_checkpoint_paths,
                                   list(state.all_model_checkpoint_timestamps) or
                                   [None] * len(state.all_model_checkpoint_paths))
            if os.path.basename(p) not in gone]
    if not kept:
        return
    stamps = [t for _, t in kept]
    tf.compat.v1.train.update_checkpoint_state(
        directory, kept[-1][0], all_model_checkpoint_paths=[p for p, _ in kept],
        all_model_checkpoint_timestamps=None if None in stamps else stamps,
        last_preserved_timestamp=state.last_preserved_timestamp)


def no_intact_error(directory: str, bad: list[tuple[str, str]]) -> UserError:
    """The one-line error when no checkpoint of `directory` reads back."""
    listed = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in bad)
    return UserError(f"no intact checkpoint in {directory}: {listed}. Nothing was deleted; "
                     f"restore the files from a copy, or use a new --workdir.")
