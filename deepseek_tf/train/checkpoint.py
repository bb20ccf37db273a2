"""Checkpoint restore with clear errors, and a run's checkpoints across workers.

Saving goes through `tf.train.CheckpointManager`: TF writes the checkpoint's
files first and updates the `checkpoint` index file (atomically) last, so an
interrupted save leaves the previous checkpoint as the latest one.

Resuming takes the newest checkpoint that reads back completely; damaged newer
ones are reported and kept for inspection, a storage hiccup is retried
(train/ckpt_health.py). Every restore goes through `workdir.restore_checkpoint`
(one clear error).

A checkpoint written by `python -m deepseek_tf.convert` holds only the model and
the step (no optimizer, data or RNG state): it is restored as the initial weights
of a fresh run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.train import ckpt_health
from deepseek_tf.workdir import restore_checkpoint
from deepseek_tf.workdir_files import CHECKPOINT_DIR

SHARDS = "optimizer_shards"  # main-checkpoint key: workers the optimizer is sharded over


def has_checkpoint(workdir: str) -> bool:
    """True when `workdir` holds a checkpoint of its own (a run to resume)."""
    return bool(tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR)))


def restore_run(checkpoint: tf.train.Checkpoint, path: str, log=print) -> int:
    """Restores run checkpoint `path` into `checkpoint`; returns its step. A converted
    checkpoint (model + step only) initialises the model and step of a fresh run."""
    weights_only = hasattr(checkpoint, "optimizer") and not any(
        name.startswith("optimizer/") for name, _ in tf.train.list_variables(path))
    if weights_only:
        checkpoint = tf.train.Checkpoint(model=checkpoint.model, step=checkpoint.step)
    restore_checkpoint(checkpoint, path, hint=". It does not match this model/config or is "
                       "damaged: use a new --workdir, or delete that checkpoint to fall back "
                       "to an older one.")
    step = int(checkpoint.step.numpy())
    if weights_only:
        log(f"initialised the model from {path} (weights only) at step {step}")
    else:
        log(f"resumed from {path} at step {step}")
    return step


class RunCheckpoints:
    """The checkpoints of a run, written safely by one or several workers.

    - `<workdir>/checkpoints/ckpt-<step>`: model, optimizer, step, RNG, and with a
      single worker its data-iterator position. With several workers every worker
      saves (TF requires it); only the chief writes here, the others write into a
      temporary directory that `close` deletes.
    - with N > 1 workers, `<workdir>/checkpoints/data-worker-<i>/ckpt-<step>`: worker
      i's own data-iterator position (its shard of the data), written by worker i.

    A save writes the data positions first, waits for every worker (`barrier`), then
    writes the main checkpoint, whose index file TF updates last: so a main
    checkpoint always has the data positions of its step.

    Args:
      workdir: run directory (shared by all workers).
      objects: trackables of the main checkpoint (must include `step`).
      data_iterator: this worker's tf.data iterator.
      role: this worker's `strategy.Role`.
      keep: checkpoints to keep.
      barrier: callable that returns when every worker called it.
      worker_objects: trackables that differ between workers (ZeRO's optimizer shard,
        train/sharding.py; expert parallelism's experts and their moments,
        train/expert_parallel.py), saved with worker i's data position; several workers
        only.
      shards: the number of workers the optimizer state (ZeRO) or the experts (expert
        parallelism) are sharded over (1 = not sharded); recorded in the main checkpoint
        (`optimizer_shards`), and a resume with another number is refused.
    """

    def __init__(self, workdir: str, objects: dict, data_iterator, role, keep: int,
                 barrier=lambda: None, worker_objects: dict | None = None, shards: int = 1):
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        self.multi = role.num_workers > 1
        self.barrier, self.last_saved = barrier, None
        self.keep, self.is_chief, self.shards = keep, role.is_chief, shards
        extra = {} if self.multi else {"data": data_iterator}
        if shards > 1:
            extra[SHARDS] = tf.Variable(shards, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(**objects, **extra)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                  max_to_keep=keep)
        self._tmp = None
        self.writer = self.manager
        if not role.is_chief:
            self._tmp = tempfile.mkdtemp(prefix=f"deepseek_tf-worker{role.index}-")
            self.writer = tf.train.CheckpointManager(self.checkpoint, self._tmp, max_to_keep=1)
        self.data_checkpoint = self.data_manager = None
        self.worker_objects = worker_objects or {}
        if self.multi:
            self.data_checkpoint = tf.train.Checkpoint(data=data_iterator, **self.worker_objects)
            self.data_manager = tf.train.CheckpointManager(
                self.data_checkpoint, os.path.join(self.directory, f"data-worker-{role.index}"),
                max_to_keep=keep)

    def restore(self, log=print) -> int:
        """Restores the chief's newest intact checkpoint (and this worker's data position
        of the same step); returns its step, 0 if there is none. The chief moves damaged
        newer ones into checkpoints/corrupt/ (see train/ckpt_health.py)."""
        self._check_shards(self.manager.latest_checkpoint)
        said = []  # "resumed from ...": after the damaged ones are reported
        _, step, bad = ckpt_health.restore_newest(
            list(reversed(self.manager.checkpoints)),
            lambda path: restore_run(self.checkpoint, path, log=said.append))
        self._set_aside(bad, log)
        for line in said[-1:]:
            log(line)
        step = step or 0
        if step and self.multi:
            path = f"{self.data_manager.directory}/ckpt-{step}"
            if not tf.io.gfile.exists(path + ".index"):
                raise UserError(f"checkpoint of step {step} has no data position {path}: was "
                                f"the run started with another number of workers? Resume "
                                f"with the same number, or use a new --workdir.")
            restore_checkpoint(self.data_checkpoint, path, hint=" (this worker's data "
                               "position): use a new --workdir.")
        self.last_saved = step or None
        return step

    def _check_shards(self, path: str | None) -> None:
        """Refuses to resume a checkpoint whose optimizer state is sharded over another
        number of workers than this run's (one line: what to do)."""
        try:
            names = {name for name, _ in tf.train.list_variables(path)} if path else set()
        except (tf.errors.OpError, ValueError):  # damaged: the restore reports it
            return
        if not any(n.startswith("optimizer/") for n in names):
            return  # none yet, or weights only (convert): initial weights
        key = f"{SHARDS}/.ATTRIBUTES/VARIABLE_VALUE"
        saved = int(tf.train.load_variable(path, key)) if key in names else 1
        if saved != self.shards:
            def held(n):
                return f"sharded over {n} workers" if n > 1 else "not sharded"

            raise UserError(
                f"checkpoint {os.path.basename(path)} holds AdamW state {held(saved)} "
                f"(--train.shard_optimizer or --model.expert_parallel), and "
                f"this run's is {held(self.shards)}: resume with the same number of workers "
                f"and the same flags, or start a new --workdir from its weights with "
                f"--train.init_from={os.path.dirname(self.directory)}.")

    def _set_aside(self, bad: list[tuple[str, str]], log) -> None:
        """Reports the damaged checkpoints; the chief moves them into checkpoints/corrupt/
        and out of the manager's list."""
        for p, why in bad:
            where = ckpt_health.quarantine(p) if self.is_chief else "left for the chief"
            log(f"checkpoint {os.path.basename(p)} is corrupt ({why}); kept for inspection "
                f"as {where}")
        if bad and self.is_chief:
            ckpt_health.forget(self.directory, [p for p, _ in bad])
            # A fresh manager reads the pruned list: keep-last-N never reaches them.
            self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                      max_to_keep=self.keep)
            self.writer = self.manager

    def path(self, step: int) -> str:
        """The run's checkpoint of `step`, in the chief's directory that every worker reads
        (a non-chief's own saves go to a temporary directory that holds neither what it
        resumed from nor what the chief keeps)."""
        return os.path.join(self.directory, f"ckpt-{step}")

    def save(self, step: int) -> None:
        """Saves `step` (once: a second call for the same step does nothing). Every
        worker must call it."""
        if step == self.last_saved:
            return
        if self.data_manager is not None:
            self.data_manager.save(checkpoint_number=step)
            self.barrier()
        self.writer.save(checkpoint_number=step)
        self.last_saved = step

    def restore_worker_objects(self, step: int) -> None:
        """Restores this worker's `worker_objects` (not its data position) from its
        checkpoint of `step` (a rollback, train/recovery.py)."""
        if self.worker_objects:
            restore_checkpoint(tf.train.Checkpoint(**self.worker_objects),
                               f"{self.data_manager.directory}/ckpt-{step}",
                               what="rolling back this worker's own state: ",
                               partial=True)

    def close(self) -> None:
        """Deletes a non-chief worker's temporary checkpoint directory."""
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
