"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): the lightning indexer and its loss.

Per query t and earlier token s the indexer scores

    I[t, s] = sum_h  w[t, h] * ReLU(q[t, h] . k[s]) * index_head_dim^-0.5,
    w = weights_proj(x) * index_n_heads^-0.5,

with queries `wq_b(q_latent)` from MLA's query latent (`q_a_layernorm(q_a_proj(x))`),
one shared key `LayerNorm(wk(x))` per token, and rotate-half (non-interleaved) RoPE
on their first `qk_rope_head_dim` dims (the main MLA may use interleaved pairs).
This is Hugging Face's `DeepseekV32Indexer` (which skips DeepSeek's Hadamard
rotation and FP8 scoring: both keep the scores). MLA then attends only to each
query's `index_topk` best tokens (`select`).

DeepSeek-V4's CSA layers score the same way, over compressed entries instead of
tokens: `token_keys=False` drops wk/k_norm (the keys come from a `KVCompressor`)
and `rope_layout="tail_pairs"` rotates the queries' last dims in interleaved pairs
(HF `DeepseekV4Indexer`).

Training (V3.2 paper, section 2.1): `indexer_kl` is the KL divergence between the
main attention's distribution (summed over heads, L1-normalised, no gradient) and
the softmax of the index scores, over the causal keys (dense warm-up) or over the
selected ones (sparse training).

Example:
    >>> ix = LightningIndexer(hidden_size=32, q_lora_rank=16, num_heads=2, head_dim=8,
    ...                       rope_head_dim=4)
    >>> x, q = tf.ones((1, 5, 32)), tf.ones((1, 5, 16))
    >>> cos, sin = RotaryEmbedding(4)(tf.range(5)[None])
    >>> mask = attention_mask(tf.ones((1, 5), tf.int32))[:, 0]
    >>> ix.scores(x, q, ix.keys(x, cos, sin), cos, sin, mask).shape
    TensorShape([1, 5, 5])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.layers.rope import apply_rotary, rotate_tail_pairs

NEG_INF = -1e9
NORM_EPS = 1e-6
INDEX_CHUNK = 512  # queries per step of `LightningIndexer.top_k` in training (bench/dsa.py)


def _rope_front(x, cos, sin, rope: int):
    """Rotate-half RoPE on the first `rope` dims of x (B, T, H, D); the rest pass."""
    x_rot, x_pass = tf.split(x, [rope, x.shape[-1] - rope], axis=-1)
    return tf.concat([apply_rotary(x_rot, cos, sin, interleave=False), x_pass], axis=-1)


ROPE_LAYOUTS = ("front", "tail_pairs")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class LightningIndexer(keras.layers.Layer):
    """The DSA indexer (HF `DeepseekV32Indexer` weights: wq_b, wk, k_norm, weights_proj).

    Args:
      hidden_size: model width (the input of wk and weights_proj).
      q_lora_rank: width of MLA's query latent (the input of wq_b).
      num_heads: indexer query heads (`index_n_heads`).
      head_dim: indexer query/key width (`index_head_dim`).
      rope_head_dim: dims that get RoPE (`qk_rope_head_dim`).
      initializer_range: stddev of the normal initializer.
      rope_layout: "front" (V3.2: rotate-half on the first dims) or "tail_pairs" (V4:
        interleaved pairs on the last dims; cos/sin of `RotaryEmbedding(rope_head_dim)`).
      token_keys: True (V3.2): wk/k_norm key every token (`keys`); False (V4): the
        caller passes compressed keys to `scores`.

    Example: see the module docstring.
    """

    def __init__(self, hidden_size: int, q_lora_rank: int, num_heads: int, head_dim: int,
                 rope_head_dim: int, initializer_range: float = 0.02, rope_layout: str = "front",
                 token_keys: bool = True, **kwargs):
        super().__init__(**kwargs)
        if head_dim < rope_head_dim:
            raise ValueError(f"head_dim={head_dim} must be >= rope_head_dim={rope_head_dim}")
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={rope_layout!r} is not one of {ROPE_LAYOUTS}")
        self.rope_layout, self.token_keys = rope_layout, token_keys
        self.hidden_size, self.q_lora_rank = hidden_size, q_lora_rank
        self.num_heads, self.head_dim, self.rope_head_dim = num_heads, head_dim, rope_head_dim
        self.initializer_range = initializer_range
        init = keras.initializers.RandomNormal(stddev=initializer_range)
        dense = lambda n, name: keras.layers.Dense(  # noqa: E731
            n, use_bias=False, kernel_initializer=init, name=name)
        self.wq_b = dense(num_heads * head_dim, "wq_b")
        self.wk = dense(head_dim, "wk") if token_keys else None
        self.k_norm = keras.layers.LayerNormalization(
            epsilon=NORM_EPS, name="k_norm") if token_keys else None
        # HF keeps weights_proj in float32 (`_keep_in_fp32_modules`).
        self.weights_proj = keras.layers.Dense(num_heads, use_bias=False, dtype="float32",
                                               kernel_initializer=init, name="weights_proj")

    def build(self, input_shape):
        lead = tuple(input_shape[:-1])
        self.wq_b.build(lead + (self.q_lora_rank,))
        if self.token_keys:
            self.wk.build(input_shape)
            self.k_norm.build(lead + (self.head_dim,))
        self.weights_proj.build(input_shape)

    def keys(self, x, cos, sin):
        """Rotated, normalised keys (B, S, head_dim) of tokens x (B, S, hidden): what a
        cache keeps per token."""
        k = tf.expand_dims(self.k_norm(self.wk(x)), 2)                  # (B, S, 1, D)
        return tf.squeeze(_rope_front(k, cos, sin, self.rope_head_dim), 2)

    def scores(self, x, q_latent, keys, cos, sin, mask):
        """Float32 index scores (B, T, S); keys that `mask` (B, T, S) excludes get -1e9.

        Args:
          x: (B, T, hidden) the queries' hidden states; q_latent: (B, T, q_lora_rank).
          keys: (B, S, head_dim) from `keys`; cos, sin: the queries' RoPE tables.
        """
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        q = tf.reshape(self.wq_b(q_latent), [b, t, self.num_heads, self.head_dim])
        if self.rope_layout == "front":
            q = _rope_front(q, cos, sin, self.rope_head_dim)
        else:
            q = rotate_tail_pairs(q, cos, sin)
        q = tf.cast(q, tf.float32)                                             # (B, T, H, D)
        keys = tf.cast(keys, tf.float32)                                       # (B, S, D)
        w = tf.cast(self.weights_proj(tf.cast(x, tf.float32)), tf.float32)
        w = w * (self.num_heads ** -0.5 * self.head_dim ** -0.5)               # (B, T, H)
        index = 0.0
        # One head at a time: (B, T, S) tensors, never (B, T, H, S).
        for q_h, w_h in zip(tf.unstack(q, axis=2), tf.unstack(w, axis=2)):
            logits = tf.nn.relu(tf.einsum("btd,bsd->bts", q_h, keys))
            index += tf.expand_dims(w_h, -1) * logits                          # (B, T, S)
        return tf.where(mask, index, NEG_INF)

    def top_k(self, x, q_latent, keys, cos, sin, mask, k: int, chunk: int | None = None):
        """Each query's K = min(k, S) best keys: (int32 positions (B, T, K), their
        float32 scores (B, T, K), differentiable for `indexer_kl`).

        With `chunk` and a static T, for causal self-attention (keys = the queries'
        own tokens, `mask` causal): queries go `chunk` at a time against only the keys
        up to the chunk's last one (at least K of them), so the (B, T, S) score
        matrix is never built and the masked half of it never scored. The sets equal
        `select` over the whole matrix (masked keys tie at -1e9, lower position first).
        """
        t, s = x.shape[1], keys.shape[1]
        if chunk is None or t is None or t <= chunk:
            scores = self.scores(x, q_latent, keys, cos, sin, mask)           # (B, T, S)
            idx = select(scores, k)
            return idx, tf.gather(scores, idx, batch_dims=2)
        k = min(k, s)
        idx, values = [], []
        for start in range(0, t, chunk):
            end = min(start + chunk, t)
            keys_end = min(max(end, k), s)
            part = self.scores(x[:, start:end], q_latent[:, start:end], keys[:, :keys_end],
                               cos[:, start:end], sin[:, start:end],
                               mask[:, start:end, :keys_end])                # (B, n, S')
            top = tf.math.top_k(part, k=k, sorted=False)
            idx.append(top.indices)
            values.append(top.values)
        return tf.concat(idx, 1), tf.concat(values, 1)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "q_lora_rank": self.q_lora_rank, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "rope_head_dim": self.rope_head_dim,
                "initializer_range": self.initializer_range, "rope_layout": self.rope_layout,
                "token_keys": self.token_keys}


def select(index_scores: tf.Tensor, topk: int) -> tf.Tensor:
    """int32 (B, T, K) positions of each query's K = min(topk, S) best keys (ties: the
    lower position first). Masked keys rank last, so a query with fewer than K
    allowed keys also gets masked ones: gather the mask with the same indices."""
    s = index_scores.shape[-1]
    k = min(topk, s) if s is not None else tf.minimum(topk, tf.shape(index_scores)[-1])
    return tf.math.top_k(index_scores, k=k, sorted=False).indices


def indexer_kl(attn_probs: tf.Tensor, index_scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Per-query KL(p || softmax(index_scores)) (B, T), float32.

    Args:
      attn_probs: (B, H, T, S) the main attention's probabilities (over all causal keys
        for the dense warm-up, over the selected ones for sparse training); p is their
        sum over heads, L1-normalised, without gradient.
      index_scores: (B, T, S) the indexer's scores over the same keys.
      mask: boolean (B, T, S) the keys both distributions range over.
    """
    p = tf.stop_gradient(tf.reduce_sum(tf.cast(attn_probs, tf.float32), axis=1))  # (B, T, S)
    p = tf.where(mask, p, 0.0)
    p = p / tf.maximum(tf.reduce_sum(p, -1, keepdims=True), 1e-20)
    log_q = tf.nn.log_softmax(tf.where(mask, tf.cast(index_scores, tf.float32), NEG_INF), -1)
    return tf.reduce_sum(tf.math.xlogy(p, p) - tf.math.multiply_no_nan(log_q, p), -1)
