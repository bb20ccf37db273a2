"""Resuming from the newest checkpoint that reads back, and what happens to the others.

Resuming restores the newest checkpoint directly: TF checks each tensor's crc32c as
it reads it, so an intact checkpoint is read once. Only when that restore fails is
the checkpoint diagnosed, by reading every tensor of it again, up to `ATTEMPTS`
times:

- it reads back on some attempt: the failure was the storage's (a network file
  system hiccup) or the checkpoint does not match the model; the restore is tried
  once more, and a mismatch then raises its own error;
- it fails every time with a storage error (permission, unavailable, out of
  memory...): one error, nothing is moved;
- it fails every time otherwise (a `.data` file cut short by a full disk or a
  killed copy, a flipped byte, a missing file): the checkpoint is damaged. It is
  reported in one line and moved, byte for byte, into `checkpoints/corrupt/` (the
  chief does this): there no `CheckpointManager` deletes it (keep-last-N) and no
  later save of the same step overwrites it. The next older one is tried.

If no checkpoint is intact nothing is moved.

Example:
    >>> path, step, bad = restore_newest(["/run/ckpts/ckpt-8", "/run/ckpts/ckpt-4"], restore)
    >>> bad
    [('/run/ckpts/ckpt-8', 'IndexError: Read less bytes than requested')]
"""

from __future__ import annotations

import glob
import os
import time

import tensorflow as tf

from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError

CORRUPT_DIR = "corrupt"
#: Reads of a checkpoint whose restore failed, before it counts as damaged.
ATTEMPTS = 3
#: Seconds before the second read (then twice that, ...).
RETRY_SECONDS = 0.5
#: Failures of the storage, not of the bytes: never a reason to quarantine.
STORAGE_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                  tf.errors.AbortedError, tf.errors.CancelledError,
                  tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                  tf.errors.UnauthenticatedError, OSError, MemoryError)


def _read_all(path: str) -> None:
    """Reads every tensor of checkpoint `path` (crc32c checked); raises on failure."""
    reader = tf.train.load_checkpoint(path)
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype == tf.variant:  # e.g. a tf.data iterator's state: no numpy form
            tf.raw_ops.RestoreV2(prefix=path, tensor_names=[key], shape_and_slices=[""],
                                 dtypes=[dtype])
        else:
            reader.get_tensor(key)


def pause(attempt: int) -> None:
    """Waits before read attempt `attempt + 1` (tests replace it)."""
    time.sleep(RETRY_SECONDS * attempt)


def read_failure(path: str, attempts: int = ATTEMPTS) -> tuple[str, bool] | None:
    """None if every tensor of checkpoint `path` reads back on one of `attempts` tries;
    else (why, one line; damaged: False for a storage error) of the last try.

    Args:
      path: a checkpoint prefix (`.../ckpt-8`).
      attempts: how many times to read it.
    """
    for attempt in range(1, attempts + 1):
        try:
            _read_all(path)
            return None
        except Exception as e:  # noqa: BLE001 -- any failure to read back counts
            text = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {text[0] if text else 'unreadable'}"
            damaged = not isinstance(e, STORAGE_ERRORS)
        if attempt < attempts:
            pause(attempt)
    return why, damaged


def restore_newest(paths: list[str], restore) -> tuple[str | None, object,
                                                       list[tuple[str, str]]]:
    """Restores the newest checkpoint of `paths` that reads back (see the module doc).

    Args:
      paths: checkpoint prefixes, newest first.
      restore: `restore(path) -> result` restores one (raises on any failure).

    Returns:
      (the restored path or None if `paths` is empty, restore's result, [(path, why)]
      of the damaged newer ones). Raises `UserError` (one line) when none reads back
      or the storage fails every time.
    """
    bad = []
    for path in paths:
        try:
            return path, restore(path), bad
        except Exception as first:  # noqa: BLE001 -- diagnosed below
            failure = read_failure(path)
            if failure is None:  # transient, or a mismatch that raises again here
                return path, restore(path), bad
            why, damaged = failure
            if not damaged:
                raise UserError(
                    f"cannot read checkpoint {path} ({why}) after {ATTEMPTS} attempts: a "
                    f"storage problem, not a damaged file. Nothing was moved; fix the "
                    f"storage and run again.") from first
            bad.append((path, why))
    if bad:
        raise no_intact_error(os.path.dirname(bad[0][0]), bad)
    return None, None, bad


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
    CheckpointManager reads on construction and prunes by keep-last-N); the entries
    left are written relative to `directory`, as the manager writes them."""
    from google.protobuf import text_format

    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return
    gone = {os.path.basename(p) for p in paths}
    stamps = list(state.all_model_checkpoint_timestamps)
    kept = [(p, stamps[i] if len(stamps) == len(state.all_model_checkpoint_paths) else None)
            for i, p in enumerate(state.all_model_checkpoint_paths)
            if os.path.basename(p) not in gone]
    if not kept:
        return
    rel = lambda p: os.path.basename(p) if os.path.dirname(p) == directory.rstrip("/") else p  # noqa: E731
    del state.all_model_checkpoint_paths[:]
    del state.all_model_checkpoint_timestamps[:]
    state.all_model_checkpoint_paths.extend(rel(p) for p, _ in kept)
    if None not in (t for _, t in kept):
        state.all_model_checkpoint_timestamps.extend(t for _, t in kept)
    state.model_checkpoint_path = rel(kept[-1][0])
    with atomic_open(os.path.join(directory, "checkpoint")) as f:
        f.write(text_format.MessageToString(state))


def no_intact_error(directory: str, bad: list[tuple[str, str]]) -> UserError:
    """The one-line error when no checkpoint of `directory` reads back."""
    listed = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in bad)
    return UserError(f"no intact checkpoint in {directory}: {listed}. Nothing was deleted; "
                     f"restore the files from a copy, or use a new --workdir.")
