"""Recovery from non-finite or exploding steps, for every precision.

As in TF Model Garden: a step whose loss or gradients are non-finite (or whose loss
exceeds `--train.loss_upper_bound`) rolls the model, optimizer, step and RNG back to
the last checkpoint this run saved (with what the objective adds, e.g. GRPO's sampled
batch: `Objective.rollback_objects`), keeps the data iterator where it is (so the
batches since that checkpoint, the offending one included, are skipped), logs it and
goes on; after `--train.recovery_max_trials` such rollbacks the run stops with one
error. mixed_float16 keeps skipping overflowing steps through its loss scale; only a
scale driven below 1 counts as a bad step. Weights are checked before every save, so
a non-finite weight is never written.

Example:
    >>> recovery = Recovery(state, exp.train, logger, workdir)
    >>> reason = recovery.problem(step, loss, skipped)
    >>> if reason:
    ...     step = recovery.roll_back(step, reason)
"""

from __future__ import annotations

import math

import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.errors import UserError
from deepseek_tf.train import precision
from deepseek_tf.train.logger import truncate_log
from deepseek_tf.workdir import restore_checkpoint

FIX = "lower --optim.learning_rate or enable clipping"


class Recovery:
    """Detects bad steps and rolls back to the last good checkpoint.

    Args:
      state: the loop's RunState (model, optimizer, step, rng, checkpoints).
      tcfg: the TrainConfig (recovery_max_trials, loss_upper_bound).
      logger: the run's MetricLogger (log.jsonl, TensorBoard, console).
      workdir: the run directory (log.jsonl is cut back to the restored step).
    """

    def __init__(self, state, tcfg: TrainConfig, logger, workdir: str):
        self.state, self.logger, self.workdir = state, logger, workdir
        self.max_trials, self.bound = tcfg.recovery_max_trials, tcfg.loss_upper_bound
        self.trials = 0

    def problem(self, step: int, loss: float, skipped: bool) -> str | None:
        """Why step `step` is bad (None if it is fine, or a normal fp16 overflow skip)."""
        if skipped:
            if not precision.is_loss_scaled(self.state.optimizer):
                return f"gradients became non-finite at step {step}"
            scale = precision.current_scale(self.state.optimizer)
            if scale >= 1.0:
                return None  # mixed_float16: skipped, the loss scale halved
            return (f"mixed_float16 gradients overflow even at loss scale {scale:g} (step "
                    f"{step}): the model diverged")
        if not math.isfinite(loss):
            return f"loss became {loss} at step {step}"
        if self.bound and loss > self.bound:
            return f"loss {loss:.4g} exceeds --train.loss_upper_bound={self.bound:g} at step {step}"
        return None

    def unsaveable(self, step: int) -> str | None:
        """Why the weights must not be saved at `step` (a non-finite value), or None."""
        for v in self.state.model.weights:
            if "float" not in str(v.dtype):  # e.g. RNG seed states
                continue
            if not bool(tf.reduce_all(tf.math.is_finite(v))):
                return f"weight {v.path} became non-finite at step {step}"
        return None

    def roll_back(self, step: int, reason: str) -> int:
        """Restores the last checkpoint this run saved or resumed from (the chief's copy,
        on every worker); returns its step.

        Raises UserError (one line) when recovery is off, the trials ran out, or no
        checkpoint was saved yet.
        """
        keep = "The last good checkpoint is kept."
        if not self.max_trials:
            raise UserError(f"{reason}; {FIX}. {keep}")
        if self.trials >= self.max_trials:
            raise UserError(f"{reason}, after {self.trials} recoveries "
                            f"(--train.recovery_max_trials={self.max_trials}); {FIX}. {keep}")
        checkpoints = self.state.checkpoints
        good = checkpoints.last_saved
        if not good:
            raise UserError(f"{reason}, before this run saved a checkpoint to roll back to; "
                            f"{FIX}, or lower --train.checkpoint_every.")
        self.trials += 1
        s = self.state  # everything but the data iterator, which stays past the bad batches
        # Every worker reads the chief's checkpoint: the same weights everywhere.
        restore_checkpoint(tf.train.Checkpoint(model=s.model, optimizer=s.optimizer,
                                               step=s.step, rng=s.rng,
                                               **s.objective.rollback_objects()),
                           checkpoints.path(good), what=f"{reason}; rolling back: ",
                           partial=True)
        checkpoints.restore_worker_objects(good)  # ZeRO: this worker's optimizer shard
        if self.logger.enabled:
            truncate_log(self.workdir, good)  # the log follows the weights
        self.logger.write_event(  # at the restored step: later rollbacks keep this line
            good, "recovery",
            {"bad_step": step, "trial": self.trials, "max_trials": self.max_trials,
             "skipped_batches": step - good, "reason": reason},
            f"recovery {self.trials}/{self.max_trials}: {reason}; rolled back to "
            f"ckpt-{good}, skipping the {step - good} batches since")
        return good
