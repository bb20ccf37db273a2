"""Preemption: SIGTERM to any worker -> every worker saves at the same step and stops.

Built on `tf.distribute.experimental.PreemptionCheckpointHandler`: the worker
that receives SIGTERM announces, through the cluster's coordination service, the
step after which everybody saves; all workers save there (through the run's own
`RunCheckpoints.save`, so the checkpoint is an ordinary one) and raise
`Preempted`. The trainer's command line turns that into exit code 42
(`exit_codes.PREEMPTED`); running the same command again resumes at that step.

The handler is given a manager over an empty private checkpoint, so it restores
nothing itself (the run restores its own checkpoint, with clear errors) and its
step counter starts at 0 on every worker of every (re)start, as its protocol
needs.

Note: TF does not handle preemption on Google Cloud CPU VMs (it logs a warning
there and SIGTERM then just ends the process; the last periodic checkpoint is
kept).

Example:
    >>> watcher = PreemptionWatcher(strategy, save_fn=checkpoints.save)
    >>> for step in ...:
    ...     train_step(...)
    ...     watcher.after_step(step)      # raises Preempted(step) after saving
    >>> watcher.close()
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile

import tensorflow as tf

from deepseek_tf import exit_codes


class Preempted(Exception):
    """Every worker saved a checkpoint at `step` after a SIGTERM; exit with code 42."""

    exit_code = exit_codes.PREEMPTED

    def __init__(self, step: int | None):
        super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}; run the "
                         f"same command again to resume from it")
        self.step = step


class _WithoutTotalRunCallsWarning(logging.Filter):
    """Drops TF's deprecation warning for `PreemptionCheckpointHandler.total_run_calls`:
    the handler's own save path reads that property (we never do), so every preemption
    printed it. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("total_run_calls" in record.getMessage()
                    and "deprecated" in record.getMessage())


_QUIET = _WithoutTotalRunCallsWarning()


class PreemptionWatcher:
    """Watches for SIGTERM during training (see the module docstring).

    Args:
      strategy: the run's strategy (its cluster resolver tells the workers apart).
      save_fn: `save_fn(step)` saves the run's checkpoint; every worker calls it.
    """

    def __init__(self, strategy, save_fn):
        self._previous_handler = signal.getsignal(signal.SIGTERM)
        self._dir = tempfile.mkdtemp(prefix="deepseek_tf-preemption-")
        self._saved_step = None

        def save(step):
            save_fn(step)
            self._saved_step = step

        def exit_fn():
            raise Preempted(self._saved_step)

        tf.get_logger().addFilter(_QUIET)  # once: a logger keeps one copy of a filter
        resolver = getattr(strategy, "cluster_resolver", None)
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(), self._dir, max_to_keep=1)
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            resolver, manager,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=exit_fn, save_fn=save, grace_period=0))

    def after_step(self, step: int) -> None:
        """Call once per step on every worker; saves and raises `Preempted` if it is time."""
        self.handler.save_checkpoint_if_preempted(step)

    def close(self) -> None:
        """Stops the handler's watcher threads and restores the previous SIGTERM handler."""
        handler = self.handler
        # TF 2.20 stops these threads only in __del__, which a running thread prevents.
        for stop in ("_stop_poll_termination_signal_thread",
                     "_stop_cluster_wise_termination_watcher_thread"):
            getattr(handler, stop, lambda: None)()
        signal.signal(signal.SIGTERM, self._previous_handler)
        shutil.rmtree(self._dir, ignore_errors=True)
