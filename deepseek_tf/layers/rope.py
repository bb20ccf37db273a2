"""Rotary position embeddings (RoPE), non-interleaved (HF `rotate_half`) layout."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RotaryEmbedding(keras.layers.Layer):
    """Maps integer positions to the cos/sin tables of rotary embeddings.

    Args:
      dim: the rotated width (even).
      theta: the frequency base.

    Example:
        >>> cos, sin = RotaryEmbedding(dim=8)(tf.range(4)[None])
        >>> cos.shape
        TensorShape([1, 4, 8])
    """

    def __init__(self, dim: int, theta: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.theta = dim, theta

    def inverse_frequencies(self) -> tf.Tensor:
        exponents = tf.range(0, self.dim, 2, dtype=tf.float32) / float(self.dim)
        return 1.0 / tf.pow(tf.constant(self.theta, tf.float32), exponents)  # (D/2,)

    def call(self, positions):
        angles = tf.cast(positions, tf.float32)[..., None] * self.inverse_frequencies()  # (B, T, D/2)
        angles = tf.concat([angles, angles], axis=-1)                                   # (B, T, D)
        return tf.cos(angles), tf.sin(angles)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "theta": self.theta}


def apply_rotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    """Rotates `x` (B, T, H, D) by position; cos/sin are (B, T, D) float32."""
    cos = tf.expand_dims(cos, 2)  # (B, T, 1, D)
    sin = tf.expand_dims(sin, 2)
    x32 = tf.cast(x, tf.float32)
    x1, x2 = tf.split(x32, 2, axis=-1)
    rotated = tf.concat([-x2, x1], axis=-1)
    return tf.cast(x32 * cos + rotated * sin, x.dtype)
