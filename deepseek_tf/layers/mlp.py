"""The gated (SwiGLU) feed-forward network."""

from __future__ import annotations

import keras
import tensorflow as tf

_ACTIVATIONS = {"silu": tf.nn.silu, "gelu": lambda x: tf.nn.gelu(x, approximate=True)}


def gated(gate, up, activation: str = "silu", limit: float = 0.0):
    """`act(gate) * up`; with `limit > 0` (DeepSeek-V4's swiglu_limit) gate is first
    clipped to <= limit and up to [-limit, limit]."""
    if limit > 0:
        gate, up = tf.minimum(gate, limit), tf.clip_by_value(up, -limit, limit)
    return _ACTIVATIONS[activation](gate) * up


@keras.saving.register_keras_serializable(package="deepseek_tf")
class GatedMLP(keras.layers.Layer):
    """`down(act(gate(x)) * up(x))`, the Llama/DeepSeek MLP.

    Args:
      hidden_size: input and output width.
      intermediate_size: the gated hidden width.
      activation: "silu" (SwiGLU) or "gelu".
      initializer_range: stddev of the normal initializer.
      swiglu_limit: > 0 clips the pre-activations (see `gated`); 0 = off.

    Example:
        >>> GatedMLP(hidden_size=8, intermediate_size=16)(tf.ones((2, 3, 8))).shape
        TensorShape([2, 3, 8])
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 initializer_range: float = 0.02, swiglu_limit: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.swiglu_limit = swiglu_limit
        self.activation, self.initializer_range = activation, initializer_range
        init = lambda: keras.initializers.RandomNormal(stddev=initializer_range)
        self.gate_proj = keras.layers.Dense(intermediate_size, use_bias=False,
                                            kernel_initializer=init(), name="gate_proj")
        self.up_proj = keras.layers.Dense(intermediate_size, use_bias=False,
                                          kernel_initializer=init(), name="up_proj")
        self.down_proj = keras.layers.Dense(hidden_size, use_bias=False,
                                            kernel_initializer=init(), name="down_proj")

    def build(self, input_shape):
        self.gate_proj.build(input_shape)
        self.up_proj.build(input_shape)
        self.down_proj.build(tuple(input_shape[:-1]) + (self.intermediate_size,))

    def call(self, x):
        h = gated(self.gate_proj(x), self.up_proj(x), self.activation,
                  self.swiglu_limit)                                             # (B, T, F)
        return self.down_proj(h)                                                # (B, T, D)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "activation": self.activation,
                "initializer_range": self.initializer_range, "swiglu_limit": self.swiglu_limit}
