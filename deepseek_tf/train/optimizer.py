"""AdamW with decoupled weight decay, linear warmup and cosine decay.

Example:
    >>> opt = make_optimizer(OptimConfig(), total_steps=1000, model=model)
"""

from __future__ import annotations

import keras

from deepseek_tf.config import OptimConfig


class AdamW(keras.optimizers.AdamW):
    """Keras AdamW that applies gradients the training step already all-reduced.

    Keras' TF optimizer sums gradients across replicas inside `apply_gradients`.
    Our step all-reduces them itself first, so that clipping and the mixed
    precision overflow check see the global gradients; summing again would
    multiply them by the number of replicas. This subclass skips that second sum.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_schedule(cfg: OptimConfig, total_steps: int) -> keras.optimizers.schedules.CosineDecay:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_lr_ratio`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else cfg.learning_rate,
        decay_steps=max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio,
        warmup_target=cfg.learning_rate if warmup else None, warmup_steps=warmup)


def no_decay(variable) -> bool:
    """Norm scales, biases (rank < 2) and embeddings get no weight decay."""
    return len(variable.shape) < 2 or "embed" in variable.path


def make_optimizer(cfg: OptimConfig, total_steps: int, model: keras.Model) -> AdamW:
    """Builds the optimizer and its slots for `model` (call inside a strategy scope)."""
    opt = AdamW(learning_rate=make_schedule(cfg, total_steps), weight_decay=cfg.weight_decay,
                beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon)
    opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if no_decay(v)])
    opt.build(model.trainable_variables)
    return opt
