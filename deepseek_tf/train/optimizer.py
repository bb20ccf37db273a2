"""AdamW with decoupled weight decay, linear warmup and cosine decay.

Example:
    >>> opt = make_optimizer(OptimConfig(), total_steps=1000, model=model)
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from deepseek_tf.config import OptimConfig


@tf.function(jit_compile=True, autograph=False)
def _fused_adamw(var, grad, m, v, lr, decay, alpha, beta_1, beta_2, epsilon, grad_scale):
    """One AdamW update as one XLA kernel: returns the new (var, m, v).

    `grad_scale` multiplies the gradient first (the step's global-norm clipping
    coefficient, so clipping costs no pass of its own). Then the same math as Keras'
    AdamW: decoupled decay `var -= var * decay * lr`, then
    `m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)`, `var -= m * alpha / (sqrt(v) + eps)`
    with `alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)`. It takes and returns tensors, not
    variables: a distributed variable passed into a tf.function inside
    `strategy.extended.update` does not reliably resolve to the local replica's copy.
    """
    grad = grad * grad_scale
    var = var - var * (decay * lr)
    m = m + (grad - m) * (1.0 - beta_1)
    v = v + (tf.square(grad) - v) * (1.0 - beta_2)
    return var - m * alpha / (tf.sqrt(v) + epsilon), m, v


class AdamW(keras.optimizers.AdamW):
    """Keras AdamW that applies gradients the training step already all-reduced, and
    (with `fused=True`) updates each variable in one XLA-compiled kernel.

    Keras' TF optimizer sums gradients across replicas inside `apply_gradients`.
    Our step all-reduces them itself first, so that clipping and the mixed
    precision overflow check see the global gradients; summing again would
    multiply them by the number of replicas. This subclass skips that second sum.

    Keras' update runs about ten element-wise ops per variable, each a full pass
    over memory; the fused kernel reads the weight, gradient and both moments once
    and writes the three results (about half of Keras' time at 13M expert weights on
    2 CPU cores; the measured figure is in README, Performance). Keras remains the
    reference (`fused=False`; the two agree to float32 rounding,
    tests/train/test_optimizer.py).

    `with opt.scaled_gradients(c): opt.apply_gradients(...)` applies `c * grad`
    (c a scalar tensor): the training step's clipping coefficient, multiplied in
    inside the fused kernel instead of in a separate pass over every gradient.

    Args:
      fused: use the fused kernel (float32 variables; others take Keras' path).
      **kwargs: `keras.optimizers.AdamW` arguments.

    Example:
        >>> opt = AdamW(learning_rate=1e-3, weight_decay=0.1)
        >>> opt.apply_gradients([(tf.ones((2,)), v)])    # v: a float32 keras.Variable
    """

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = fused and not self.amsgrad
        self._grad_scale = None

    @contextlib.contextmanager
    def scaled_gradients(self, scale: tf.Tensor):
        """Inside, `apply_gradients` applies `scale * grad` (see the class doc). Replicas
        that enter it together (MirroredStrategy) must pass the same value."""
        self._grad_scale = scale
        try:
            yield
        finally:
            self._grad_scale = None

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)

    def _takes_fused(self, variable) -> bool:
        return self.fused and variable.dtype == tf.float32

    def _apply_weight_decay(self, variables):
        # The fused update applies the decay itself; the others decay here, as Keras does.
        super()._apply_weight_decay([v for v in variables if not self._takes_fused(v)])

    def update_step(self, gradient, variable, learning_rate):
        scale = self._grad_scale
        if not self._takes_fused(variable):
            if scale is not None:
                gradient = gradient * tf.cast(scale, gradient.dtype)
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        new_var, new_m, new_v = self.fused_update(
            variable, gradient, m, v, learning_rate, self.decay_of(variable),
            1.0 if scale is None else scale)
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(variable, new_var)

    def decay_of(self, variable) -> float:
        """The decoupled weight decay of `variable` (0 for the excluded ones)."""
        return self.weight_decay if self.weight_decay and self._use_weight_decay(variable) \
            else 0.0

    def fused_update(self, var, grad, m, v, learning_rate, decay, grad_scale):
        """The fused kernel's new (var, m, v) as tensors, at this optimizer's step count.

        Args:
          var, grad, m, v: float32 tensors (or variables) of one shape: a variable, or a
            flat shard of several (train/sharding.py).
          learning_rate: this step's learning rate.
          decay: the weight decay, a scalar or one value per element of `var`.
          grad_scale: scalar multiplied into `grad` (e.g. the clipping coefficient).
        """
        lr = tf.cast(learning_rate, tf.float32)
        t = tf.cast(self.iterations + 1, tf.float32)
        alpha = lr * tf.sqrt(1.0 - tf.pow(self.beta_2, t)) / (1.0 - tf.pow(self.beta_1, t))
        return _fused_adamw(
            tf.convert_to_tensor(var), tf.convert_to_tensor(grad, tf.float32),
            tf.convert_to_tensor(m), tf.convert_to_tensor(v), lr,
            tf.cast(decay, tf.float32), alpha, tf.constant(self.beta_1, tf.float32),
            tf.constant(self.beta_2, tf.float32), tf.constant(self.epsilon, tf.float32),
            tf.cast(grad_scale, tf.float32))


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


def make_optimizer(cfg: OptimConfig, total_steps: int, model: keras.Model,
                   slots: bool = True, variables=None) -> AdamW:
    """Builds the optimizer and its slots for `model` (call inside a strategy scope);
    `slots=False` builds it without moments (train/sharding.py keeps them, sharded);
    `variables`: the ones it updates (default: every trainable one; expert parallelism
    leaves out each worker's own experts, train/expert_parallel.py)."""
    opt = AdamW(learning_rate=make_schedule(cfg, total_steps), weight_decay=cfg.weight_decay,
                beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon, fused=cfg.fused)
    opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if no_decay(v)])
    opt.build((model.trainable_variables if variables is None else variables) if slots else [])
    return opt
