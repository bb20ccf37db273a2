"""DeepSeek-V4's KV compressor: one key/value entry per `compress_rate` tokens.

Window w (tokens w*m .. w*m+m-1) becomes the softmax-gated sum of its tokens'
projections, `sum_j softmax_j(gate_j + position_bias_j) * kv_j`, RMS-normalised, with
RoPE (interleaved pairs on the last dims, `rotate_tail_pairs`) at position w*m.
HCA layers use it plain (m' = 128). CSA layers (m = 4) use the overlapping form:
the projections are twice as wide, and entry w pools window w's second half with
window w-1's first half (2m slots; window 0 has no predecessor). A query at position
p may read entry w only once its window is complete: w < (p + 1) // m
(`compressed_mask`). The trailing tokens of an incomplete window are not compressed.
This is Hugging Face's `DeepseekV4HCACompressor` / the compressor half of
`DeepseekV4CSACompressor` and `DeepseekV4Indexer` (same weight names).

Example:
    >>> c = KVCompressor(hidden_size=16, head_dim=8, compress_rate=4, rope_head_dim=4)
    >>> c(tf.ones((2, 10, 16))).shape   # 2 complete windows of 4
    TensorShape([2, 2, 8])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import RopeScaling
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.rope import RotaryEmbedding, rotate_tail_pairs

_EMPTY_GATE = -1e30  # the missing predecessor of window 0: softmax weight exactly 0


def compressed_mask(positions: tf.Tensor, num_entries, compress_rate: int) -> tf.Tensor:
    """Boolean (B, T, W): query at `positions` (B, T) may read compressed entry w."""
    ready = (positions + 1) // compress_rate                                 # (B, T)
    return tf.range(num_entries)[None, None, :] < ready[:, :, None]


@keras.saving.register_keras_serializable(package="deepseek_tf")
class KVCompressor(keras.layers.Layer):
    """Compresses tokens (B, T, hidden) into entries (B, T // m, head_dim).

    Args:
      hidden_size: model width.
      head_dim: width of each compressed entry.
      compress_rate: tokens per entry m.
      overlap: CSA's overlapping windows (projections 2 * head_dim wide).
      rope_head_dim: trailing dims that get RoPE.
      rope_theta: RoPE base (`compress_rope_theta`).
      rope_scaling: optional RoPE scaling (see `RotaryEmbedding`).
      norm_eps: epsilon of kv_norm.
      initializer_range: stddev of the normal initializer.

    Example: see the module docstring.
    """

    def __init__(self, hidden_size: int, head_dim: int, compress_rate: int,
                 overlap: bool = False, rope_head_dim: int = 64, rope_theta: float = 160000.0,
                 rope_scaling: RopeScaling | dict | None = None, norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.head_dim, self.compress_rate = hidden_size, head_dim, compress_rate
        self.overlap, self.rope_head_dim, self.rope_theta = overlap, rope_head_dim, rope_theta
        self.norm_eps, self.initializer_range = norm_eps, initializer_range
        self.width = head_dim * (2 if overlap else 1)
        init = keras.initializers.RandomNormal(stddev=initializer_range)
        self.kv_proj = keras.layers.Dense(self.width, use_bias=False, kernel_initializer=init,
                                          name="kv_proj")
        self.gate_proj = keras.layers.Dense(self.width, use_bias=False,
                                            kernel_initializer=init, name="gate_proj")
        self.kv_norm = RMSNorm(norm_eps, name="kv_norm")
        self.rotary = RotaryEmbedding(rope_head_dim, rope_theta, rope_scaling, name="rotary")

    def build(self, input_shape):
        self.kv_proj.build(input_shape)
        self.gate_proj.build(input_shape)
        self.position_bias = self.add_weight(name="position_bias", initializer="zeros",
                                             shape=(self.compress_rate, self.width),
                                             dtype="float32", autocast=False)
        self.kv_norm.build(tuple(input_shape[:-1]) + (self.head_dim,))

    def call(self, x):
        m, d = self.compress_rate, self.head_dim
        b = tf.shape(x)[0]
        w = x.shape[1] // m if x.shape[1] is not None else tf.shape(x)[1] // m
        x = x[:, :w * m]
        kv = tf.reshape(tf.cast(self.kv_proj(x), tf.float32), [b, w, m, self.width])
        gate = tf.reshape(tf.cast(self.gate_proj(x), tf.float32), [b, w, m, self.width])
        gate = gate + self.position_bias.value                              # (B, W, m, width)
        if self.overlap:  # slots: window w-1's first half, then window w's second half
            shift = [[0, 0], [1, 0], [0, 0], [0, 0]]
            kv = tf.concat([tf.pad(kv[..., :d], shift)[:, :w], kv[..., d:]], axis=2)
            gate = tf.concat([tf.pad(gate[..., :d], shift, constant_values=_EMPTY_GATE)[:, :w],
                              gate[..., d:]], axis=2)                       # (B, W, 2m, d)
        pooled = tf.reduce_sum(kv * tf.nn.softmax(gate, axis=2), axis=2)    # (B, W, d)
        pooled = self.kv_norm(tf.cast(pooled, x.dtype))
        cos, sin = self.rotary(tf.broadcast_to(tf.range(w)[None] * m, [b, w]))
        return tf.squeeze(rotate_tail_pairs(pooled[:, :, None], cos, sin), 2)

    def get_config(self):
        s = self.rotary.scaling
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "head_dim": self.head_dim, "compress_rate": self.compress_rate,
                "overlap": self.overlap, "rope_head_dim": self.rope_head_dim,
                "rope_theta": self.rope_theta, "rope_scaling": s.to_dict() if s else None,
                "norm_eps": self.norm_eps, "initializer_range": self.initializer_range}
