"""Gradient checkpointing (rematerialization) and stateless dropout.

`maybe_remat(fn, enabled)` wraps `fn` with `keras.remat` (on TensorFlow:
`tf.recompute_grad`): its activations are not kept for the backward pass but
recomputed there. Two traps (BUILD.md, "Known traps") shape how it is used:

- remat of a layer whose call takes `training=` as a keyword fails inside
  `tf.function`: wrap a closure over the positional tensor instead,
  `maybe_remat(lambda h: block(h, training=training), True)(x)`;
- Keras `Dropout` draws a new mask when the block is recomputed, which gives
  wrong gradients: dropout here is stateless, from an explicit seed tensor that
  the closure captures, so the recomputation draws the same mask.

Example:
    >>> y = maybe_remat(lambda h: mlp(norm(h)), enabled=True)(x)
    >>> y = stateless_dropout(y, rate=0.1, seed=fold_seed(seed, 2))
"""

from __future__ import annotations

import keras
import tensorflow as tf

REMAT_MODES = ("none", "block", "mlp", "attention")


def maybe_remat(fn, enabled: bool):
    """`fn`, recomputed in the backward pass if `enabled`."""
    return keras.remat(fn) if enabled else fn


def fold_seed(seed, salt: int):
    """A stateless seed derived from `seed` (shape (2,) int) and `salt`; None stays None."""
    if seed is None:
        return None
    return tf.random.experimental.stateless_fold_in(seed, salt)


def stateless_dropout(x, rate: float, seed):
    """Dropout of `x` with a mask drawn from `seed`; identity if `rate` is 0 or seed None."""
    if not rate or seed is None:
        return x
    return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)
