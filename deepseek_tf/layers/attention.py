"""Causal grouped-query attention with an explicitly built mask, and the hybrid mix.

The mask is causal AND same-segment, built from `segment_ids` with plain ops
(band_part / expand_dims), not Keras' causal-mask op, so packed documents never
attend to each other and the graph converts to TFLite with builtin ops only.

Hybrid attention (`sliding_window > 0`): the same scores go through two softmaxes,
the global one (the full mask) and a local one (the mask AND the last
`sliding_window` tokens); the outputs are mixed `global_weight * global +
local_weight * local` (default 0.7 / 0.3).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import RopeScaling
from deepseek_tf.layers.kv_cache import write_slots
from deepseek_tf.layers.remat import stateless_dropout
from deepseek_tf.layers.rope import RotaryEmbedding, apply_rotary

NEG_INF = -1e9


def attention_mask(segment_ids: tf.Tensor) -> tf.Tensor:
    """Boolean (B, 1, T, T) mask: query i may attend key j iff j <= i and same segment.

    Args:
      segment_ids: int (B, T) document ids of a packed window.
    """
    t = tf.shape(segment_ids)[1]
    causal = tf.cast(tf.linalg.band_part(tf.ones(tf.stack([t, t]), tf.int8), -1, 0), tf.bool)
    same = tf.equal(tf.expand_dims(segment_ids, 2), tf.expand_dims(segment_ids, 1))  # (B, T, T)
    return tf.expand_dims(tf.logical_and(same, causal), 1)                           # (B, 1, T, T)


def masked_softmax(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Softmax over the last axis in float32, with `mask` False -> excluded."""
    scores = tf.where(mask, tf.cast(scores, tf.float32), NEG_INF)
    return tf.nn.softmax(scores, axis=-1)


def grouped_bias(mask: tf.Tensor, groups: int) -> tf.Tensor:
    """Float32 additive bias (B, 1, G·T, M) of a boolean mask (B, 1, T, M): 0 where
    attended, NEG_INF where not (finite: a padding query masked everywhere gets a
    harmless row, not NaN), the T query rows repeated for `groups` query heads."""
    bias = tf.where(mask, 0.0, NEG_INF)                                   # (B, 1, T, M)
    if groups == 1:
        return bias
    b, t, m = tf.shape(mask)[0], tf.shape(mask)[2], tf.shape(mask)[3]
    return tf.reshape(tf.tile(bias[:, :, None], [1, 1, groups, 1, 1]), [b, 1, groups * t, m])


def sliding_window_mask(t, window: int) -> tf.Tensor:
    """Boolean (T, T): key j is within the last `window` tokens of query i (j <= i).

    Built by comparing ranges, not `band_part`, which rejects a window wider than T.
    """
    distance = tf.expand_dims(tf.range(t), 1) - tf.expand_dims(tf.range(t), 0)  # (T, T) i - j
    return tf.logical_and(distance >= 0, distance < window)


def attention_probs(scores: tf.Tensor, mask: tf.Tensor, sliding_window: int = 0,
                    global_weight: float = 1.0, local_weight: float = 0.0,
                    local_mask: tf.Tensor | None = None, groups: int = 1) -> tf.Tensor:
    """Float32 attention probabilities (B, N, G·T, S) of `scores` under a boolean mask.

    The masks (B, 1, T, S) enter as additive biases (`grouped_bias`), the form in which
    oneDNN fuses the scores' matmul, its scale and the bias into one op (float32); for
    rows with an attended key the probabilities equal a select-then-softmax bit for bit.
    With `sliding_window > 0`: `global_weight * softmax(global) + local_weight *
    softmax(local)`, the local mask also restricting keys to the last `sliding_window`
    (for square scores; a cached call passes its own `local_mask`).

    Args:
      scores: (B, N, G·T, S) scaled scores, the T query rows repeated per group.
      mask, local_mask: boolean (B, 1, T, S).
      groups: G, the query heads sharing a row block (see `grouped_bias`).
    """
    scores = tf.cast(scores, tf.float32)
    probs = tf.nn.softmax(scores + grouped_bias(mask, groups))
    if sliding_window:
        if local_mask is None:
            local_mask = tf.logical_and(
                mask, sliding_window_mask(tf.shape(scores)[-1], sliding_window))
        probs = global_weight * probs + local_weight * tf.nn.softmax(
            scores + grouped_bias(local_mask, groups))
    return probs


def _dense(units: int, use_bias: bool, initializer_range: float, name: str):
    return keras.layers.Dense(units, use_bias=use_bias, name=name,
                              kernel_initializer=keras.initializers.RandomNormal(
                                  stddev=initializer_range))


@keras.saving.register_keras_serializable(package="deepseek_tf")
class GroupedQueryAttention(keras.layers.Layer):
    """Multi-head attention with `num_kv_heads` shared key/value heads and RoPE.

    Args:
      hidden_size: model width (input and output).
      num_heads: query heads.
      num_kv_heads: key/value heads; must divide `num_heads` (== num_heads: MHA).
      head_dim: per-head width.
      use_bias: biases on q/k/v (Qwen2); the output projection has none.
      rope_theta: rotary frequency base.
      initializer_range: stddev of the normal initializer.
      rope_scaling: optional RoPE scaling (`ModelConfig.resolved_rope_scaling`, or its
        `to_dict()`).
      sliding_window: > 0 makes it hybrid: a local branch over the last
        `sliding_window` tokens, mixed with the global one.
      global_weight, local_weight: the hybrid mix (ignored without a window).
      attention_dropout: dropout rate on the attention probabilities, applied only
        when `call` gets a `dropout_seed` (stateless, so remat recomputes the same mask).

    Example:
        >>> attn = GroupedQueryAttention(hidden_size=16, num_heads=4, num_kv_heads=2,
        ...                              head_dim=4)
        >>> seg = tf.ones((2, 5), tf.int32)
        >>> attn(tf.ones((2, 5, 16)), positions=tf.zeros((2, 5), tf.int32),
        ...      attention_mask=attention_mask(seg)).shape
        TensorShape([2, 5, 16])
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 use_bias: bool = False, rope_theta: float = 10000.0,
                 initializer_range: float = 0.02,
                 rope_scaling: RopeScaling | dict | None = None,
                 sliding_window: int = 0, global_weight: float = 0.7,
                 local_weight: float = 0.3, attention_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.use_bias = head_dim, use_bias
        self.rope_theta, self.initializer_range = rope_theta, initializer_range
        self.rope_scaling = RopeScaling.coerce(rope_scaling)
        self.sliding_window = sliding_window
        self.global_weight, self.local_weight = global_weight, local_weight
        self.attention_dropout = attention_dropout
        self.q_proj = _dense(num_heads * head_dim, use_bias, initializer_range, "q_proj")
        self.k_proj = _dense(num_kv_heads * head_dim, use_bias, initializer_range, "k_proj")
        self.v_proj = _dense(num_kv_heads * head_dim, use_bias, initializer_range, "v_proj")
        self.o_proj = _dense(hidden_size, False, initializer_range, "o_proj")
        self.rotary = RotaryEmbedding(head_dim, rope_theta, self.rope_scaling, name="rotary")

    def build(self, input_shape):
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.build(input_shape)
        self.o_proj.build(tuple(input_shape[:-1]) + (self.num_heads * self.head_dim,))

    def call(self, x, positions, attention_mask, dropout_seed=None):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = tf.reshape(self.q_proj(x), [b, t, h, d])   # (B, T, H, D)
        k = tf.reshape(self.k_proj(x), [b, t, kv, d])  # (B, S, K, D)
        v = tf.reshape(self.v_proj(x), [b, t, kv, d])  # (B, S, K, D)
        cos, sin = self.rotary(positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self._attend(q, tf.transpose(k, [0, 2, 1, 3]), tf.transpose(v, [0, 2, 1, 3]),
                           attention_mask, dropout_seed=dropout_seed)     # (B, T, H, D)
        return self.o_proj(tf.reshape(out, [b, t, h * d]))           # (B, T, hidden)

    def _attend(self, q, keys, values, mask, local_mask=None, dropout_seed=None):
        """Queries (B, T, H, D) over keys and values (B, K, S, D) under boolean masks
        (B, 1, T, S) -> (B, T, H, D). Batched matmuls over (B, K) with the G query
        heads of a KV head as rows (see `attention_probs`)."""
        b, t = tf.shape(q)[0], tf.shape(q)[1]
        kv, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // kv
        q = tf.reshape(tf.transpose(tf.reshape(q, [b, t, kv, g, d]), [0, 2, 3, 1, 4]),
                       [b, kv, g * t, d])                                  # (B, K, G·T, D)
        scores = tf.matmul(q, keys, transpose_b=True) * (d ** -0.5)       # (B, K, G·T, S)
        probs = attention_probs(scores, mask, self.sliding_window, self.global_weight,
                                self.local_weight, local_mask, groups=g)
        probs = stateless_dropout(probs, self.attention_dropout, dropout_seed)
        out = tf.matmul(tf.cast(probs, values.dtype), values)             # (B, K, G·T, D)
        return tf.transpose(tf.reshape(out, [b, kv, g, t, d]), [0, 3, 1, 2, 4])

    def call_cached(self, x, positions, cache, slots, mask, local_mask=None):
        """Attends `x`'s tokens, written into cache slots `slots`, to the whole cache.

        Args:
          x: (B, T, hidden) the new tokens; positions: int32 (B, T) their positions.
          cache: (keys, values), each (B, K, M, D) (see `layers.kv_cache`).
          slots: int32 (T,) the cache slots of the new tokens.
          mask, local_mask: boolean (B, 1, T, M) from `kv_cache.cache_masks`.

        Returns ((B, T, hidden), the updated cache).
        """
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = tf.reshape(self.q_proj(x), [b, t, h, d])   # (B, T, H, D)
        k = tf.reshape(self.k_proj(x), [b, t, kv, d])  # (B, T, K, D)
        v = tf.reshape(self.v_proj(x), [b, t, kv, d])
        cos, sin = self.rotary(positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = write_slots(cache[0], tf.transpose(k, [0, 2, 1, 3]), slots)    # (B, K, M, D)
        values = write_slots(cache[1], tf.transpose(v, [0, 2, 1, 3]), slots)  # (B, K, M, D)
        out = self._attend(q, keys, values, mask, local_mask)                # (B, T, H, D)
        return self.o_proj(tf.reshape(out, [b, t, h * d])), (keys, values)

    def cache_shape(self, batch: int, max_length: int) -> tuple:
        """Shapes of this layer's (keys, values) cache."""
        shape = (batch, self.num_kv_heads, max_length, self.head_dim)
        return shape, shape

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "use_bias": self.use_bias,
                "rope_theta": self.rope_theta, "initializer_range": self.initializer_range,
                "rope_scaling": self.rope_scaling.to_dict() if self.rope_scaling else None,
                "sliding_window": self.sliding_window,
                "global_weight": self.global_weight, "local_weight": self.local_weight,
                "attention_dropout": self.attention_dropout}
