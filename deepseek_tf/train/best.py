"""The best checkpoint (lowest validation loss) and early stopping.

The best model is written to `<workdir>/best/ckpt-<step>` (model weights
and step, one checkpoint, replaced when a better evaluation comes), apart from the rolling
`ckpt-N` files that keep-last-N deletes; `best.json` beside it records its step and
loss. `--train.early_stopping_patience=P` stops training after P evaluations in a
row without a new best. Both survive a resume: the best loss is read back from
`best.json`, and the evaluations since it from `log.jsonl`.

Example:
    >>> best = BestCheckpoint(workdir, model, step_var, patience=3)
    >>> stop = best.update(step, eval_loss)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import tensorflow as tf

from deepseek_tf.atomic import atomic_write
from deepseek_tf.train.logger import read_log

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestCheckpoint:
    """Keeps the lowest-validation-loss weights and counts evaluations since.

    Args:
      workdir: the run directory.
      model: the model whose weights are saved.
      step: the run's step variable (saved with the weights).
      patience: evaluations without improvement before `update` says stop (0 = never).
      is_chief: only the chief writes into the workdir (others write a temporary copy,
        as every worker must take part in a save).
    """

    def __init__(self, workdir: str, model, step, patience: int = 0, is_chief: bool = True):
        self.directory = os.path.join(workdir, BEST_DIR)
        self.patience, self.is_chief = patience, is_chief
        self.checkpoint = tf.train.Checkpoint(model=model, step=step)
        self.best_loss, self.best_step, self.since = float("inf"), 0, 0
        path = os.path.join(self.directory, BEST_FILE)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.best_loss, self.best_step = saved["loss"], saved["step"]
            self.since = sum(1 for r in read_log(workdir)
                             if r.get("kind") == "eval" and r["step"] > self.best_step)

    def update(self, step: int, loss: float) -> bool:
        """Records an evaluation; saves the weights if `loss` is the best so far.
        Returns True when early stopping should end the run."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since = loss, step, 0
            self._save(step, loss)
        else:
            self.since += 1
        return bool(self.patience) and self.since >= self.patience

    def _save(self, step: int, loss: float) -> None:
        target = self.directory if self.is_chief else tempfile.mkdtemp(prefix="dstf-best-")
        tf.train.CheckpointManager(self.checkpoint, target, max_to_keep=1).save(
            checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(target, ignore_errors=True)
            return
        atomic_write(os.path.join(target, BEST_FILE),
                     json.dumps({"step": int(step), "loss": float(loss)}))

    @property
    def path(self) -> str:
        """The best checkpoint's prefix (for `--checkpoint` of generate/evaluate/export)."""
        return tf.train.latest_checkpoint(self.directory) or self.directory
