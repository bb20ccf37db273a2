"""DeepSeek-V4's KV compressor: one key/value entry per `compress_rate` tokens.

Window w (tokens w*m .. w*m+m-1) becomes the softmax-gated sum of its tokens'
projections, `sum_j softmax_j(gate_j + position_bias_j) * kv_j`, RMS-normalised, with
RoPE (interleaved pairs on the last dims, `rotate_tail_pairs`) at position w*m.
HCA layers use it plain (m' = 128). CSA layers (m = 4) use the overlapping form:
the projections are twice as wide, and entry w pools window w's second half with
window w-1's first half (2m slots; window 0 has no predecessor). The trailing tokens
of an incomplete window are not compressed.

Windows are counted within each document from its position 0, so packed training
rows (several documents, `positions` restarting at each) compress every document
as if it were alone: `window_ends` finds each complete window's last token (a token
whose position p has (p + 1) % m == 0), in order, and the entries are pooled from
the tokens before it. A query may read an entry when it may attend that last token
(same document, not in its future): `compressed_mask`. For one document from
position 0, entry w ends at token w*m + m - 1: the query at position p reads entries
w < (p + 1) // m, as Hugging Face's does.
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


def window_ends(positions: tf.Tensor, num_entries: int, compress_rate: int):
    """(int32 (B, W) the sequence index of each complete window's last token, in
    order, boolean (B, W) which of the W = T // m slots hold one).

    A row has at most T // m complete windows however its documents are packed.
    """
    t = tf.shape(positions)[1]
    is_end = tf.equal((positions + 1) % compress_rate, 0)                   # (B, T)
    index = tf.range(t)[None]
    order = tf.argsort(tf.where(is_end, index, index + t), axis=1, stable=True)
    ends = order[:, :num_entries]                                            # (B, W)
    return ends, tf.gather(is_end, ends, batch_dims=1)


def compressed_mask(attention_mask: tf.Tensor, ends: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Boolean (B, T, W): the query may read entry w, i.e. may attend its window's last
    token `ends` (B, W) under `attention_mask` (B, 1, T, T), and the slot holds one."""
    return tf.logical_and(tf.gather(attention_mask[:, 0], ends, axis=2, batch_dims=1),
                          valid[:, None, :])


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

    def project(self, x):
        """Per-token (B, T, 2 * width): kv_proj(x) then gate_proj(x), what a KV cache
        keeps for compressing later."""
        return tf.concat([self.kv_proj(x), self.gate_proj(x)], -1)

    def call(self, x, positions=None):
        """Entries (B, W, head_dim), W = T // m, of tokens x (B, T, hidden) at
        per-document `positions` (B, T) (default 0..T-1); slots past the row's
        complete windows hold unused values (`window_ends` flags them)."""
        if positions is None:
            positions = tf.broadcast_to(tf.range(tf.shape(x)[1])[None], tf.shape(x)[:2])
        return self.pool(self.project(x), positions)

    def pool(self, projections, positions, ends=None):
        """Entries (B, W, head_dim) from `project`'s (B, S, 2 * width) at `positions`
        (B, S); W = S // m. `ends`: `window_ends(positions, W, m)[0]` if the caller
        has it already."""
        m, d = self.compress_rate, self.head_dim
        s = projections.shape[1] if projections.shape[1] is not None else tf.shape(projections)[1]
        if ends is None:
            ends, _ = window_ends(positions, s // m, m)                     # (B, W)
        window = ends[:, :, None] - (m - 1) + tf.range(m)                   # (B, W, m) tokens
        first = tf.gather(positions, ends, batch_dims=1) - (m - 1)          # (B, W) w * m
        kv_all, gate_all = tf.split(projections, 2, axis=-1)                # (B, S, width)

        def rows(proj, index):  # the projection at token `index` (clamped), float32
            return tf.cast(tf.gather(proj, tf.maximum(index, 0), batch_dims=1), tf.float32)

        kv, gate = rows(kv_all, window), rows(gate_all, window)             # (B, W, m, width)
        gate = gate + self.position_bias.value
        if self.overlap:  # slots: window w-1's first half, then window w's second half
            before = window - m
            has_before = (first >= m)[:, :, None, None]                     # window 0: none
            gate_b = tf.where(has_before, rows(gate_all, before)[..., :d]
                              + self.position_bias.value[:, :d], _EMPTY_GATE)
            kv = tf.concat([rows(kv_all, before)[..., :d], kv[..., d:]], axis=2)
            gate = tf.concat([gate_b, gate[..., d:]], axis=2)               # (B, W, 2m, d)
        pooled = tf.reduce_sum(kv * tf.nn.softmax(gate, axis=2), axis=2)    # (B, W, d)
        pooled = self.kv_norm(tf.cast(pooled, projections.dtype))
        cos, sin = self.rotary(tf.maximum(first, 0))
        return tf.squeeze(rotate_tail_pairs(pooled[:, :, None], cos, sin), 2)

    def get_config(self):
        s = self.rotary.scaling
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "head_dim": self.head_dim, "compress_rate": self.compress_rate,
                "overlap": self.overlap, "rope_head_dim": self.rope_head_dim,
                "rope_theta": self.rope_theta, "rope_scaling": s.to_dict() if s else None,
                "norm_eps": self.norm_eps, "initializer_range": self.initializer_range}
