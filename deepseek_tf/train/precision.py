"""Mixed precision: dtype policies and loss scaling with a *global* overflow decision.

`--train.precision`:
- `float32`: everything in float32.
- `mixed_bfloat16`: float32 weights, bfloat16 compute; bfloat16 has float32's
  range, so no loss scaling.
- `mixed_float16`: float32 weights, float16 compute, dynamic loss scaling with
  Keras' `LossScaleOptimizer` (halve the scale and skip the step on overflow,
  double it after 2000 good steps).

In every mode norms (RMSNorm statistics and scale), rotary tables, the
attention softmax, logits and losses stay float32 (the layers cast).

The global decision. Keras' `LossScaleOptimizer` checks "are the gradients
finite?" on each replica; if replicas disagreed (MirroredStrategy would then write
NaN into the weights, MWMS would deadlock). Our train step decides from the global
norm of the *all-reduced* gradients, the same tensor on every replica (an inf or
NaN on any replica makes the sum non-finite everywhere); if it is not finite,
`poison` makes the gradients non-finite on every replica, so all of them skip the
step and halve the scale together.
Skipped steps are `loop steps - optimizer.iterations` (both checkpointed).

Example:
    >>> with policy_scope("mixed_float16"):
    ...     model = DeepSeekCausalLM(cfg)        # float16 compute, float32 weights
    >>> opt = wrap_optimizer(make_optimizer(...), train_cfg, model.trainable_variables)
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.model import policy_scope  # noqa: F401  (train.precision.policy_scope)


def uses_loss_scale(precision: str) -> bool:
    return precision == "mixed_float16"


def wrap_optimizer(optimizer, cfg: TrainConfig, variables):
    """`optimizer`, wrapped in a dynamic LossScaleOptimizer for mixed_float16 (built on
    `variables`; call inside the strategy scope)."""
    if not uses_loss_scale(cfg.precision):
        return optimizer
    wrapped = keras.optimizers.LossScaleOptimizer(optimizer,
                                                  initial_scale=cfg.initial_loss_scale)
    wrapped.build(variables)
    return wrapped


def is_loss_scaled(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def loss_scale(optimizer) -> tf.Tensor:
    """The current loss scale as a float32 tensor (1 without loss scaling)."""
    if is_loss_scaled(optimizer):
        return tf.identity(optimizer.dynamic_scale.value)
    return tf.constant(1.0, tf.float32)


def current_scale(optimizer) -> float:
    """The loss scale on the host (1.0 without loss scaling)."""
    if is_loss_scaled(optimizer):
        return float(optimizer.dynamic_scale.value.numpy())
    return 1.0


def poison(grads, finite: tf.Tensor):
    """`grads` unchanged if `finite`, else with a NaN in the smallest one, so that the
    optimizer's own finiteness check fails on every replica alike."""
    smallest = min(range(len(grads)), key=lambda i: grads[i].shape.num_elements() or 0)
    out = list(grads)
    out[smallest] = grads[smallest] + tf.where(finite, 0.0, float("nan"))
    return out
