"""Multi-head Latent Attention (DeepSeek-V2/V3).

Queries: `q_proj(x)`, or with `q_lora_rank > 0` the low-rank path
`q_b_proj(norm(q_a_proj(x)))`. Keys and values come from one compressed latent:
`kv_a_proj_with_mqa(x)` gives the latent (kv_lora_rank, normalised by
`kv_a_layernorm`) and a single shared RoPE key (qk_rope_head_dim); `kv_b_proj`
expands the latent into per-head no-RoPE keys and values. Each head's score is
`q_nope . k_nope + q_rope . k_rope_shared`, scaled by `(nope + rope)^-0.5` times
YaRN's `mscale(factor, mscale_all_dim)^2` when YaRN is on.

Weight names and layouts follow HF `DeepseekV3Attention`, so the converter maps
tensors one to one. The latent norms use epsilon 1e-6 as DeepSeek's (and HF's)
`RMSNorm(q_lora_rank)` / `RMSNorm(kv_lora_rank)` do, whatever `rms_norm_eps` is.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import RopeScaling
from deepseek_tf.layers.attention import _dense, attention_probs, masked_softmax
from deepseek_tf.layers.indexer import INDEX_CHUNK, LightningIndexer, indexer_kl
from deepseek_tf.layers.kv_cache import write_slots
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.quantized import float_kernel
from deepseek_tf.layers.remat import stateless_dropout
from deepseek_tf.layers.rope import RotaryEmbedding, apply_rotary, yarn_get_mscale
from deepseek_tf.layers.sparse_attention import CHUNK, gathered_attention

LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(qk_head_dim: int, rope_scaling: RopeScaling | dict | None) -> float:
    """`qk_head_dim^-0.5`, times YaRN's `mscale(factor, mscale_all_dim)^2` if set."""
    scale = qk_head_dim ** -0.5
    s = RopeScaling.coerce(rope_scaling)
    if s and s.type == "yarn" and s.mscale_all_dim:
        m = yarn_get_mscale(s.factor, s.mscale_all_dim)
        scale *= m * m
    return scale


@keras.saving.register_keras_serializable(package="deepseek_tf")
class MultiHeadLatentAttention(keras.layers.Layer):
    """DeepSeek MLA with a decoupled shared RoPE key.

    Args:
      hidden_size: model width (input and output).
      num_heads: attention heads.
      q_lora_rank: rank of the query path; 0 = a plain `q_proj`.
      kv_lora_rank: width of the compressed KV latent.
      qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head widths.
      use_bias: biases on q_a_proj, kv_a_proj_with_mqa and o_proj (DeepSeek-V2 option).
      rope_theta: rotary frequency base.
      rope_scaling: optional RoPE scaling (`ModelConfig.resolved_rope_scaling`, or its
        `to_dict()`).
      rope_interleave: RoPE on interleaved pairs (DeepSeek checkpoint layout).
      initializer_range: stddev of the normal initializer.
      sliding_window, global_weight, local_weight: hybrid local/global mix (0 = off).
      attention_dropout: dropout rate on the attention probabilities, applied only
        when `call` gets a `dropout_seed` (stateless, so remat recomputes the same mask).
      index_topk: > 0 adds DeepSeek Sparse Attention (needs q_lora_rank): a
        `LightningIndexer` (`index_n_heads` x `index_head_dim`) picks the keys each
        query attends to. The attribute `dsa_dense` (set by the model for the dense
        warm-up stage) makes `call` attend densely while the indexer still learns.

    Example:
        >>> mla = MultiHeadLatentAttention(hidden_size=32, num_heads=4, q_lora_rank=16,
        ...                                kv_lora_rank=8, qk_nope_head_dim=8,
        ...                                qk_rope_head_dim=4, v_head_dim=8)
        >>> seg = tf.ones((2, 5), tf.int32)
        >>> mla(tf.ones((2, 5, 32)), positions=tf.zeros((2, 5), tf.int32),
        ...     attention_mask=attention_mask(seg)).shape
        TensorShape([2, 5, 32])
    """

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 use_bias: bool = False, rope_theta: float = 10000.0,
                 rope_scaling: RopeScaling | dict | None = None, rope_interleave: bool = False,
                 initializer_range: float = 0.02, sliding_window: int = 0,
                 global_weight: float = 0.7, local_weight: float = 0.3,
                 attention_dropout: float = 0.0, index_topk: int = 0,
                 index_head_dim: int = 128, index_n_heads: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.attention_dropout = attention_dropout
        self.index_topk, self.index_head_dim = index_topk, index_head_dim
        self.index_n_heads, self.dsa_dense = index_n_heads, False
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim, self.use_bias = v_head_dim, use_bias
        self.rope_theta, self.rope_interleave = rope_theta, rope_interleave
        self.rope_scaling = RopeScaling.coerce(rope_scaling)
        self.initializer_range = initializer_range
        self.sliding_window, self.global_weight, self.local_weight = (
            sliding_window, global_weight, local_weight)
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = mla_softmax_scale(self.qk_head_dim, self.rope_scaling)
        ir, h = initializer_range, num_heads
        if q_lora_rank:
            self.q_a_proj = _dense(q_lora_rank, use_bias, ir, "q_a_proj")
            self.q_a_layernorm = RMSNorm(LATENT_NORM_EPS, name="q_a_layernorm")
            self.q_b_proj = _dense(h * self.qk_head_dim, False, ir, "q_b_proj")
        else:
            self.q_proj = _dense(h * self.qk_head_dim, False, ir, "q_proj")
        self.kv_a_proj_with_mqa = _dense(kv_lora_rank + qk_rope_head_dim, use_bias, ir,
                                         "kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(LATENT_NORM_EPS, name="kv_a_layernorm")
        self.kv_b_proj = _dense(h * (qk_nope_head_dim + v_head_dim), False, ir, "kv_b_proj")
        self.o_proj = _dense(hidden_size, use_bias, ir, "o_proj")
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta, self.rope_scaling,
                                      name="rotary")
        self.indexer = LightningIndexer(
            hidden_size, q_lora_rank, index_n_heads, index_head_dim, qk_rope_head_dim,
            initializer_range, name="indexer") if index_topk else None

    def build(self, input_shape):
        lead = tuple(input_shape[:-1])
        if self.q_lora_rank:
            self.q_a_proj.build(input_shape)
            self.q_a_layernorm.build(lead + (self.q_lora_rank,))
            self.q_b_proj.build(lead + (self.q_lora_rank,))
        else:
            self.q_proj.build(input_shape)
        self.kv_a_proj_with_mqa.build(input_shape)
        self.kv_a_layernorm.build(lead + (self.kv_lora_rank,))
        self.kv_b_proj.build(lead + (self.kv_lora_rank,))
        self.o_proj.build(lead + (self.num_heads * self.v_head_dim,))
        if self.indexer is not None:
            self.indexer.build(input_shape)

    def _queries(self, x, positions):
        """Per-head queries: no-RoPE (B, T, H, nope) and rotated RoPE (B, T, H, rope)
        parts, and the query latent (B, T, q_lora_rank) (None without q_lora)."""
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        nope, rope = self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        else:
            q_latent, q = None, self.q_proj(x)
        q = tf.reshape(q, [b, t, self.num_heads, nope + rope])       # (B, T, H, nope+rope)
        q_nope, q_rope = tf.split(q, [nope, rope], axis=-1)
        cos, sin = self.rotary(positions)
        return q_nope, apply_rotary(q_rope, cos, sin, self.rope_interleave), q_latent

    def _latent(self, x, positions):
        """What MLA caches per token: the normalised latent (B, T, kv_lora_rank) and
        the rotated shared RoPE key (B, T, rope)."""
        kv_a = self.kv_a_proj_with_mqa(x)                            # (B, T, latent+rope)
        latent, k_rope = tf.split(kv_a, [self.kv_lora_rank, self.qk_rope_head_dim], axis=-1)
        cos, sin = self.rotary(positions)
        k_rope = apply_rotary(tf.expand_dims(k_rope, 2), cos, sin, self.rope_interleave)
        return self.kv_a_layernorm(latent), tf.squeeze(k_rope, 2)

    def _expand(self, latent):
        """Latent (B, S, c) -> per-head keys (B, S, H, nope) and values (B, S, H, dv)."""
        b, s = tf.shape(latent)[0], tf.shape(latent)[1]
        kv = tf.reshape(self.kv_b_proj(latent),
                        [b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim])
        return tf.split(kv, [self.qk_nope_head_dim, self.v_head_dim], axis=-1)

    def _attend(self, q_nope, q_rope, latent, k_rope, mask, local_mask=None,
                dropout_seed=None, return_probs=False):
        """The naive path: expand the latent into per-head keys/values, then attend
        (batched matmuls over (B, H); see `attention_probs`). As in transformers, the
        scores are one matmul of the concatenated [no-RoPE, RoPE] queries and keys; the
        softmax scale multiplies the queries (B, H, T, nope+rope), not the scores
        (B, H, T, S): on the issue-3 config in bfloat16 that cut the attention's
        forward + backward by a quarter (two (B, H, T, S) matmuls, their sum and the
        scale's multiply become one matmul)."""
        b, t = tf.shape(q_nope)[0], tf.shape(q_nope)[1]
        s, h = tf.shape(latent)[1], self.num_heads
        k_nope, v = self._expand(latent)                             # (B, S, H, nope|dv)
        q = tf.concat([q_nope, q_rope], -1) * self.scale             # (B, T, H, nope+rope)
        k_rope = tf.broadcast_to(k_rope[:, :, None], [b, s, h, self.qk_rope_head_dim])
        k = tf.concat([k_nope, k_rope], -1)                          # (B, S, H, nope+rope)
        q, k, v = (tf.transpose(x, [0, 2, 1, 3]) for x in (q, k, v))  # (B, H, ., .)
        scores = tf.matmul(q, k, transpose_b=True)                   # (B, H, T, S)
        probs = attention_probs(scores, mask, self.sliding_window,
                                self.global_weight, self.local_weight, local_mask)
        dropped = stateless_dropout(probs, self.attention_dropout, dropout_seed)
        out = tf.matmul(tf.cast(dropped, v.dtype), v)                # (B, H, T, dv)
        out = self.o_proj(tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, t, h * self.v_head_dim]))
        return (out, probs) if return_probs else out

    def _absorbed_weights(self, dtype):
        """`kv_b_proj`'s kernel split into the key (c, H, nope) and value (c, H, dv)
        up-projections that the absorbed path folds into queries and outputs."""
        w = tf.reshape(tf.cast(float_kernel(self.kv_b_proj), dtype),
                       [self.kv_lora_rank, self.num_heads, self.qk_nope_head_dim + self.v_head_dim])
        return tf.split(w, [self.qk_nope_head_dim, self.v_head_dim], axis=-1)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask, local_mask=None):
        """The absorbed path: the key up-projection folded into the query, attention
        over the latent itself, the value up-projection applied after attention: one
        batched matmul per score and context with the H heads' queries as rows and
        [latent, RoPE key] as the keys (see `attention_probs`)."""
        b, t = tf.shape(q_nope)[0], tf.shape(q_nope)[1]
        h, c = self.num_heads, self.kv_lora_rank
        w_uk, w_uv = self._absorbed_weights(q_nope.dtype)            # (c, H, nope|dv)
        q_latent = tf.einsum("bthn,chn->bthc", q_nope, w_uk)         # (B, T, H, c)
        q = tf.transpose(tf.concat([q_latent, q_rope], -1), [0, 2, 1, 3])  # (B, H, T, c + r)
        q = tf.reshape(q, [b, 1, h * t, c + self.qk_rope_head_dim])  # (B, 1, H·T, c + r)
        keys = tf.concat([latent, k_rope], -1)[:, None]              # (B, 1, S, c + r)
        scores = tf.matmul(q, keys, transpose_b=True) * self.scale   # (B, 1, H·T, S)
        probs = attention_probs(scores, mask, self.sliding_window, self.global_weight,
                                self.local_weight, local_mask, groups=h)
        context = tf.matmul(tf.cast(probs, latent.dtype), latent[:, None])  # (B, 1, H·T, c)
        out = tf.einsum("bhtc,chd->bthd", tf.reshape(context, [b, h, t, c]), w_uv)  # (B, T, H, dv)
        return self.o_proj(tf.reshape(out, [b, t, h * self.v_head_dim]))

    def _attend_selected(self, q_nope, q_rope, latent, k_rope, mask, idx, absorb=True,
                         dropout_seed=None, chunk=None):
        """DSA: each query attends only to its K keys `idx` (B, T, K), gathered from the
        latent (B, S, c) and RoPE keys (B, S, r): O(T K) work, not O(T S). Absorbed
        (`layers.sparse_attention`, `chunk` queries at a time; attention dropout takes
        the naive path) or naive (the selected latents expanded per head). Returns
        ((B, T, hidden), probs (B, H, T, K), the gathered mask (B, T, K))."""
        b, t = tf.shape(q_nope)[0], tf.shape(q_nope)[1]
        h, nope, dv = self.num_heads, self.qk_nope_head_dim, self.v_head_dim
        valid = tf.gather(mask[:, 0], idx, batch_dims=2)             # (B, T, K)
        if absorb and not (self.attention_dropout and dropout_seed is not None):
            w_uk, w_uv = self._absorbed_weights(q_nope.dtype)        # (c, H, nope|dv)
            q_latent = tf.einsum("bthn,chn->bthc", q_nope, w_uk)     # (B, T, H, c)
            context, probs = gathered_attention(
                tf.concat([q_latent, q_rope], -1), (latent, k_rope), idx,
                valid, self.scale, chunk)                            # (B, T, H, c + r)
            out = tf.einsum("bthc,chd->bthd", context[..., :self.kv_lora_rank], w_uv)
            return self.o_proj(tf.reshape(out, [b, t, h * dv])), probs, valid
        sel = tf.gather(latent, idx, batch_dims=1)                   # (B, T, K, c)
        sel_rope = tf.gather(k_rope, idx, batch_dims=1)              # (B, T, K, r)
        k = tf.shape(idx)[2]
        kv = tf.reshape(self.kv_b_proj(sel), [b, t, k, h, nope + dv])
        k_nope, v = tf.split(kv, [nope, dv], axis=-1)                # (B, T, K, H, nope|dv)
        scores = (tf.einsum("bthd,btkhd->bhtk", q_nope, k_nope)
                  + tf.einsum("bthd,btkd->bhtk", q_rope, sel_rope))
        probs = masked_softmax(scores * self.scale, tf.expand_dims(valid, 1))  # (B, H, T, K)
        dropped = tf.cast(stateless_dropout(probs, self.attention_dropout, dropout_seed),
                          v.dtype)
        out = tf.einsum("bhtk,btkhd->bthd", dropped, v)
        return self.o_proj(tf.reshape(out, [b, t, h * dv])), probs, valid

    def _dsa(self, x, q_nope, q_rope, q_latent, latent, k_rope, index_keys, positions, mask,
             absorb=None, dropout_seed=None, return_aux=False):
        """Attention through the indexer: the top-`index_topk` keys (dense in the warm-up
        stage, or when every key fits). `absorb` None: dense attention naive, sparse
        attention absorbed (training); a bool sets both (cached calls). With
        `return_aux`: (out, {"indexer_kl": (B, T)})."""
        s = latent.shape[1]
        if not return_aux and s is not None and s <= self.index_topk:  # every key selected
            if absorb and dropout_seed is None:
                return self._attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
            return self._attend(q_nope, q_rope, latent, k_rope, mask, dropout_seed=dropout_seed)
        cos, sin = self.rotary(positions)
        # The indexer learns only from its KL loss: no gradient into the main model.
        x_in, q_in = tf.stop_gradient(x), tf.stop_gradient(q_latent)
        if self.dsa_dense:
            out, probs = self._attend(q_nope, q_rope, latent, k_rope, mask,
                                      dropout_seed=dropout_seed, return_probs=True)
            kl_mask = mask[:, 0]
            kl_scores = self.indexer.scores(x_in, q_in, index_keys, cos, sin, kl_mask)
        else:
            # Training and scoring (`absorb` None: causal self-attention) go through the
            # queries in chunks; cached calls run in one piece (no loop or custom
            # gradient in the export graphs).
            chunked = absorb is None
            idx, kl_scores = self.indexer.top_k(
                x_in, q_in, index_keys, cos, sin, mask[:, 0], self.index_topk,
                INDEX_CHUNK if chunked else None)                        # (B, T, K)
            out, probs, kl_mask = self._attend_selected(
                q_nope, q_rope, latent, k_rope, mask, idx,
                self._absorbable() if chunked else absorb, dropout_seed,
                CHUNK if chunked else None)
        if not return_aux:
            return out
        return out, {"indexer_kl": indexer_kl(probs, kl_scores, kl_mask)}

    def call(self, x, positions, attention_mask, dropout_seed=None, return_aux=False):
        """(B, T, hidden); with DSA and `return_aux`: (out, {"indexer_kl": (B, T)})."""
        q_nope, q_rope, q_latent = self._queries(x, positions)
        latent, k_rope = self._latent(x, positions)
        if self.indexer is None:
            return self._attend(q_nope, q_rope, latent, k_rope, attention_mask,
                                dropout_seed=dropout_seed)            # (B, T, hidden)
        cos, sin = self.rotary(positions)
        index_keys = self.indexer.keys(tf.stop_gradient(x), cos, sin)   # (B, S, D)
        return self._dsa(x, q_nope, q_rope, q_latent, latent, k_rope, index_keys, positions,
                         attention_mask, None, dropout_seed, return_aux)

    def call_cached(self, x, positions, cache, slots, mask, local_mask=None, absorb=True):
        """Attends `x`'s tokens, written into cache slots `slots`, to the whole cache.

        Args:
          x: (B, T, hidden) the new tokens; positions: int32 (B, T) their positions.
          cache: (latent (B, 1, M, kv_lora_rank), rope key (B, 1, M, qk_rope_head_dim));
            with DSA the second also holds the indexer key: (B, 1, M, rope + index_head_dim).
          slots: int32 (T,) the cache slots of the new tokens.
          mask, local_mask: boolean (B, 1, T, M) from `kv_cache.cache_masks`.
          absorb: attend in latent space (the decode path); False expands the whole
            cached latent into per-head keys and values first (the reference).

        Returns ((B, T, hidden), the updated cache).
        """
        q_nope, q_rope, q_latent = self._queries(x, positions)
        latent, k_rope = self._latent(x, positions)
        if self.indexer is not None:  # the indexer key rides with the RoPE key
            cos, sin = self.rotary(positions)
            k_rope = tf.concat([k_rope, tf.cast(self.indexer.keys(x, cos, sin), k_rope.dtype)],
                               -1)                                    # (B, T, r + D)
        latent_cache = write_slots(cache[0], tf.expand_dims(latent, 1), slots)  # (B, 1, M, c)
        rope_cache = write_slots(cache[1], tf.expand_dims(k_rope, 1), slots)    # (B, 1, M, r|r+D)
        absorb = absorb and self._absorbable()
        keys, rope_keys = tf.squeeze(latent_cache, 1), tf.squeeze(rope_cache, 1)
        if self.indexer is not None:
            rope_keys, index_keys = tf.split(
                rope_keys, [self.qk_rope_head_dim, self.index_head_dim], -1)
            out = self._dsa(x, q_nope, q_rope, q_latent, keys, rope_keys, index_keys,
                            positions, mask, absorb)
        else:
            attend = self._attend_absorbed if absorb else self._attend
            out = attend(q_nope, q_rope, keys, rope_keys, mask, local_mask)
        return out, (latent_cache, rope_cache)

    def _absorbable(self) -> bool:
        """Absorption reads `kv_b_proj`'s float kernel (not after int8 quantization)."""
        return getattr(self.kv_b_proj, "quantization_mode", None) is None

    def cache_shape(self, batch: int, max_length: int) -> tuple:
        """Shapes of this layer's (latent, rope key) cache."""
        extra = self.index_head_dim if self.indexer is not None else 0
        return ((batch, 1, max_length, self.kv_lora_rank),
                (batch, 1, max_length, self.qk_rope_head_dim + extra))

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "num_heads": self.num_heads, "q_lora_rank": self.q_lora_rank,
                "kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
                "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim,
                "use_bias": self.use_bias, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling.to_dict() if self.rope_scaling else None,
                "rope_interleave": self.rope_interleave,
                "initializer_range": self.initializer_range,
                "sliding_window": self.sliding_window, "global_weight": self.global_weight,
                "local_weight": self.local_weight, "attention_dropout": self.attention_dropout,
                "index_topk": self.index_topk, "index_head_dim": self.index_head_dim,
                "index_n_heads": self.index_n_heads}
