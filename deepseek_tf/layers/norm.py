"""RMSNorm with float32 statistics."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RMSNorm(keras.layers.Layer):
    """Root-mean-square layer norm: `x / rms(x) * scale`, computed in float32.

    The result is cast back to the input's dtype, so it is safe under mixed
    precision.

    Args:
      epsilon: added to the mean square before the reciprocal square root.

    Example:
        >>> RMSNorm(epsilon=1e-6)(tf.ones((2, 3, 8))).shape
        TensorShape([2, 3, 8])
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],),
                                     initializer="ones", dtype="float32",
                                     autocast=False)  # float32 even under mixed precision

    def call(self, x):
        x32 = tf.cast(x, tf.float32)                                   # (..., D)
        var = tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True)  # (..., 1)
        y = x32 * tf.math.rsqrt(var + self.epsilon) * tf.cast(self.scale.value, tf.float32)
        return tf.cast(y, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
