"""DeepSeek-V4 attention: shared-KV multi-query attention over a sliding window plus
compressed entries.

Every layer: queries from a low-rank path (`q_a_proj` -> RMSNorm -> `q_b_proj`, then
a weightless RMSNorm per head), one key/value head per token (`kv_proj` -> RMSNorm;
the key IS the value), RoPE on each head's last `rope_head_dim` dims in interleaved
pairs, attention over the last `sliding_window` tokens, a learned per-head sink
logit in the softmax's denominator, the RoPE of the output undone (values carry it),
and a grouped output projection (`o_a_proj` per head group, then `o_b_proj`).

`layer_type` adds compressed entries (`KVCompressor`) to the keys:
  - heavily_compressed_attention (HCA): every complete entry of `compress_rate`
    tokens;
  - compressed_sparse_attention (CSA): only each query's `index_topk` best entries,
    as the lightning indexer (`LightningIndexer` on its own compressor's keys)
    ranks them.
Sliding layers use RoPE base `rope_theta`; compressed layers pass
`compress_rope_theta`. This is Hugging Face's `DeepseekV4Attention` (its weight names);
`call_cached` is the static-size KV-cache call of generation.

Example:
    >>> attn = V4Attention(hidden_size=32, num_heads=4, head_dim=16, rope_head_dim=8,
    ...                    q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=4,
    ...                    layer_type="heavily_compressed_attention", compress_rate=4)
    >>> pos = tf.range(10)[None]
    >>> attn(tf.ones((1, 10, 32)), pos, attention_mask(tf.ones((1, 10), tf.int32))).shape
    TensorShape([1, 10, 32])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import RopeScaling
from deepseek_tf.config.v4 import V4_LAYER_TYPES
from deepseek_tf.layers.attention import attention_mask, sliding_window_mask  # noqa: F401 (doc)
from deepseek_tf.layers.compressor import KVCompressor, compressed_mask, window_ends
from deepseek_tf.layers.hyper import unweighted_rms_norm
from deepseek_tf.layers.indexer import LightningIndexer, indexer_kl, select
from deepseek_tf.layers.kv_cache import write_slots
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.rope import RotaryEmbedding, rotate_tail_pairs


def sink_softmax(logits: tf.Tensor, mask: tf.Tensor, sinks: tf.Tensor) -> tf.Tensor:
    """Softmax of float32 `logits` (B, H, T, S) over the allowed keys, with one extra
    logit `sinks` (H,) per head in the denominator only (its probability is dropped)."""
    sink = tf.reshape(sinks, [1, -1, 1, 1])
    top = tf.maximum(tf.reduce_max(tf.where(mask, logits, -1e30), -1, keepdims=True), sink)
    e = tf.where(mask, tf.exp(logits - top), 0.0)
    return e / (tf.reduce_sum(e, -1, keepdims=True) + tf.exp(sink - top))


@keras.saving.register_keras_serializable(package="deepseek_tf")
class V4Attention(keras.layers.Layer):
    """One DeepSeek-V4 attention layer (HF `DeepseekV4Attention`).

    Args:
      hidden_size: model width.
      num_heads: query heads.
      head_dim: width of each head and of the shared key/value.
      rope_head_dim: trailing dims with RoPE (`qk_rope_head_dim`).
      q_lora_rank: width of the query latent.
      o_groups, o_lora_rank: grouped output projection (head groups, per-group width).
      sliding_window: the window branch reads the last `sliding_window` tokens.
      layer_type: sliding_attention, compressed_sparse_attention or
        heavily_compressed_attention.
      compress_rate: tokens per compressed entry (compressed types).
      rope_theta: RoPE base of this layer (compressed types: `compress_rope_theta`).
      rope_scaling: optional RoPE scaling of this layer.
      index_n_heads, index_head_dim, index_topk: CSA's lightning indexer.
      norm_eps: RMSNorm epsilon.
      initializer_range: stddev of the normal initializer.

    Call: `attn(x, positions, attention_mask, return_aux=False)` with x (B, T, hidden),
    positions (B, T) and the boolean (B, 1, T, T) mask of `attention_mask(segment_ids)`.
    With `return_aux` a CSA layer returns (out, {"indexer_kl": (B, T)}): the KL from the
    main attention over the selected entries to the indexer's scores (V3.2's sparse
    stage), the indexer's only training signal (it sees the inputs without gradient).

    Example: see the module docstring.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rope_head_dim: int,
                 q_lora_rank: int, o_groups: int, o_lora_rank: int, sliding_window: int,
                 layer_type: str = "sliding_attention", compress_rate: int = 0,
                 rope_theta: float = 10000.0, rope_scaling: RopeScaling | dict | None = None,
                 index_n_heads: int = 64, index_head_dim: int = 128, index_topk: int = 512,
                 norm_eps: float = 1e-6, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        if layer_type not in V4_LAYER_TYPES:
            raise ValueError(f"layer_type={layer_type!r} is not one of {V4_LAYER_TYPES}")
        if layer_type != "sliding_attention" and compress_rate <= 0:
            raise ValueError(f"{layer_type} needs compress_rate > 0, got {compress_rate}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rope_head_dim, self.q_lora_rank = rope_head_dim, q_lora_rank
        self.o_groups, self.o_lora_rank, self.sliding_window = o_groups, o_lora_rank, sliding_window
        self.layer_type, self.compress_rate, self.rope_theta = layer_type, compress_rate, rope_theta
        self.index_n_heads, self.index_head_dim = index_n_heads, index_head_dim
        self.index_topk, self.norm_eps, self.initializer_range = index_topk, norm_eps, initializer_range
        init = lambda: keras.initializers.RandomNormal(stddev=initializer_range)  # noqa: E731
        dense = lambda n, name: keras.layers.Dense(  # noqa: E731
            n, use_bias=False, kernel_initializer=init(), name=name)
        self.q_a_proj = dense(q_lora_rank, "q_a_proj")
        self.q_a_norm = RMSNorm(norm_eps, name="q_a_norm")
        self.q_b_proj = dense(num_heads * head_dim, "q_b_proj")
        self.kv_proj = dense(head_dim, "kv_proj")
        self.kv_norm = RMSNorm(norm_eps, name="kv_norm")
        self.o_b_proj = dense(hidden_size, "o_b_proj")
        self.rotary = RotaryEmbedding(rope_head_dim, rope_theta, rope_scaling, name="rotary")
        rope = dict(rope_head_dim=rope_head_dim, rope_theta=rope_theta, norm_eps=norm_eps,
                    rope_scaling=rope_scaling, initializer_range=initializer_range)
        csa = layer_type == "compressed_sparse_attention"
        self.compressor = None if layer_type == "sliding_attention" else KVCompressor(
            hidden_size, head_dim, compress_rate, overlap=csa, name="compressor", **rope)
        self.index_compressor = self.indexer = None
        # Set by the model for the dense warm-up stage (V3.2's): CSA layers read every
        # complete entry while the indexer learns the main attention's distribution.
        self.dsa_dense = False
        if csa:
            self.index_compressor = KVCompressor(hidden_size, index_head_dim, compress_rate,
                                                 overlap=True, name="index_compressor", **rope)
            self.indexer = LightningIndexer(
                hidden_size, q_lora_rank, index_n_heads, index_head_dim, rope_head_dim,
                initializer_range, rope_layout="tail_pairs", token_keys=False, name="indexer")

    def build(self, input_shape):
        lead = tuple(input_shape[:-1])
        self.q_a_proj.build(input_shape)
        self.q_a_norm.build(lead + (self.q_lora_rank,))
        self.q_b_proj.build(lead + (self.q_lora_rank,))
        self.kv_proj.build(input_shape)
        self.kv_norm.build(lead + (self.head_dim,))
        per_group = self.num_heads * self.head_dim // self.o_groups
        # HF's layout [groups * o_lora_rank, per-group input]: rows g*r..g*r+r-1 are group g's.
        self.o_a_proj = self.add_weight(
            name="o_a_proj", shape=(self.o_groups * self.o_lora_rank, per_group),
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_range))
        self.o_b_proj.build(lead + (self.o_groups * self.o_lora_rank,))
        self.sinks = self.add_weight(name="sinks", shape=(self.num_heads,), initializer="zeros",
                                     dtype="float32", autocast=False)
        for layer in (self.compressor, self.index_compressor, self.indexer):
            if layer is not None:
                layer.build(input_shape)

    def _compressed(self, x, q_latent, cos, sin, key_mask, projections, key_positions):
        """(compressed keys (B, W, D), boolean (B, T, W) entries each query reads, the
        indexer's (B, T, W) scores or None).

        Args:
          key_mask: boolean (B, 1, T, S) which of the S key tokens each query may see.
          projections: the compressor's and (CSA) the index compressor's `project`
            outputs (B, S, ...) of the key tokens, at per-document `key_positions` (B, S).
        """
        s = key_positions.shape[1] if key_positions.shape[1] is not None else tf.shape(
            key_positions)[1]
        ends, valid = window_ends(key_positions, s // self.compress_rate, self.compress_rate)
        keys = self.compressor.pool(projections[0], key_positions, ends)   # (B, W, D)
        mask = compressed_mask(key_mask, ends, valid)
        if self.indexer is None or keys.shape[1] == 0:
            return keys, mask, None
        index_keys = self.index_compressor.pool(projections[1], key_positions, ends)
        return (keys, *self._select(x, q_latent, cos, sin, index_keys, mask))

    def _select(self, x, q_latent, cos, sin, index_keys, mask):
        """CSA: (boolean (B, T, W) `mask` narrowed to each query's `index_topk` entries
        as the indexer ranks `index_keys` (B, W, Di), its (B, T, W) scores)."""
        x, q_latent = tf.stop_gradient(x), tf.stop_gradient(q_latent)  # trained by its KL
        scores = self.indexer.scores(x, q_latent, index_keys, cos, sin, mask)
        if self.dsa_dense:
            return mask, scores
        picked = select(scores, self.index_topk)                            # (B, T, K)
        # (B, T, W): entry w is among the query's picks (an int8 one-hot max is not a
        # TFLite builtin; equal + any is).
        chosen = tf.reduce_any(tf.equal(picked[..., None], tf.range(tf.shape(mask)[2])), 2)
        return tf.logical_and(mask, chosen), scores

    def _cached_entries(self, x, q_latent, cos, sin, positions, slots, projections, entries,
                        key_positions):
        """Incremental compression for `call_cached`: the entries whose window the new
        tokens complete are pooled (from the cached projections, so a window may span
        earlier calls) and written to entry slot w = (p + 1) // m - 1 of their row; the
        queries read entry w iff w < (p + 1) // m (the row is one document from slot
        `pad`). Returns (keys (B, E, D), boolean (B, T, E) mask, the updated entry
        caches); E = M // m.

        Args:
          positions: int32 (B, T) the new tokens' positions; slots: int32 (T,) theirs.
          projections: the updated projection caches (B, M, 2 width) per compressor.
          entries: the entry caches (B, 1, M, width) per compressor (rows < E used).
          key_positions: int32 (B, M) every slot's position.
        """
        m = self.compress_rate
        e = entries[0].shape[2] // m if entries[0].shape[2] is not None else (
            tf.shape(entries[0])[2] // m)
        ends = tf.broadcast_to(slots[None], tf.shape(positions))             # (B, T)
        is_end = tf.equal((positions + 1) % m, 0)                            # (B, T)
        slot = tf.where(is_end, (positions + 1) // m - 1, -1)               # (B, T) entry
        hit = tf.one_hot(slot, tf.shape(entries[0])[2], dtype=tf.float32)   # (B, T, M)
        written = tf.reduce_max(hit, axis=1)[:, None, :, None] > 0          # (B, 1, M, 1)
        new = []
        for c, proj, cache in zip((self.compressor, self.index_compressor), projections,
                                  entries):
            fresh = c.pool(proj, key_positions, ends)                       # (B, T, width)
            scattered = tf.einsum("btd,btm->bmd", tf.cast(fresh, tf.float32), hit)
            new.append(tf.where(written, tf.cast(scattered[:, None], cache.dtype), cache))
        readable = tf.range(e)[None, None] < ((positions + 1) // m)[..., None]  # (B, T, E)
        keys = new[0][:, 0, :e]
        if self.indexer is None:
            return keys, readable, new
        mask, _ = self._select(x, q_latent, cos, sin, new[1][:, 0, :e], readable)
        return keys, mask, new

    def _project(self, x, positions):
        """(query latent (B, T, r), rotated queries (B, T, H, D), rotated keys (B, T, D),
        cos, sin) of tokens x."""
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        q_latent = self.q_a_norm(self.q_a_proj(x))                          # (B, T, r)
        q = tf.reshape(self.q_b_proj(q_latent), [b, t, self.num_heads, self.head_dim])
        cos, sin = self.rotary(positions)
        q = rotate_tail_pairs(unweighted_rms_norm(q, self.norm_eps), cos, sin)  # (B, T, H, D)
        kv = self.kv_norm(self.kv_proj(x))[:, :, None]
        return q_latent, q, rotate_tail_pairs(kv, cos, sin)[:, :, 0], cos, sin

    def _attend(self, x, q, cos, sin, keys, mask):
        """(output (B, T, hidden), float32 probs (B, H, T, S)) of queries q over keys
        (B, S, D), which are also the values, under mask (B, 1, T, S)."""
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        logits = tf.einsum("bthd,bsd->bhts", tf.cast(q, tf.float32), tf.cast(keys, tf.float32))
        probs = sink_softmax(logits * self.head_dim ** -0.5, mask, self.sinks.value)
        out = tf.einsum("bhts,bsd->bthd", tf.cast(probs, x.dtype), tf.cast(keys, x.dtype))
        out = rotate_tail_pairs(out, cos, -sin)                             # (B, T, H, D)
        grouped = tf.reshape(out, [b, t, self.o_groups, -1])                # (B, T, G, H*D/G)
        o_a = tf.reshape(tf.cast(self.o_a_proj, x.dtype), [self.o_groups, self.o_lora_rank, -1])
        y = tf.einsum("btgi,gri->btgr", grouped, o_a)                       # (B, T, G, r)
        return self.o_b_proj(tf.reshape(y, [b, t, self.o_groups * self.o_lora_rank])), probs

    def _projections(self, x):
        """The compressors' `project` outputs of tokens x (the indexer's on x without
        gradient: only its KL trains it)."""
        out = [self.compressor.project(x)]
        if self.indexer is not None:
            out.append(self.index_compressor.project(tf.stop_gradient(x)))
        return out

    def call(self, x, positions, attention_mask, return_aux=False):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        q_latent, q, keys, cos, sin = self._project(x, positions)
        mask = tf.logical_and(attention_mask, sliding_window_mask(t, self.sliding_window))
        scores = None
        if self.compressor is not None:
            c_keys, c_mask, scores = self._compressed(
                x, q_latent, cos, sin, attention_mask, self._projections(x), positions)
            keys = tf.concat([keys, tf.cast(c_keys, keys.dtype)], axis=1)   # (B, T + W, D)
            mask = tf.concat([mask, c_mask[:, None]], axis=-1)              # (B, 1, T, T + W)
        y, probs = self._attend(x, q, cos, sin, keys, mask)
        if not return_aux or self.indexer is None:
            return (y, {}) if return_aux else y
        if scores is None:  # no complete entry yet
            return y, {"indexer_kl": tf.zeros([b, t])}
        return y, {"indexer_kl": indexer_kl(probs[..., t:], scores, c_mask)}

    def call_cached(self, x, positions, cache, slots, mask, local_mask, key_positions):
        """Attends `x`'s tokens, written into cache slots `slots`, to the cache.

        Args:
          x: (B, T, hidden) the new tokens; positions: int32 (B, T) their positions.
          cache: (keys (B, 1, M, D)[, per compressor (the compressor's, then CSA's
            index compressor's) its projections (B, 1, M, 2 width), then per compressor
            its entries (B, 1, M, width)]) (`cache_shape`). Each entry is pooled once,
            when the token ending its window arrives (`_cached_entries`); the
            projections keep the not-yet-compressed tail (and the window before it,
            which CSA's overlapping entries read).
          slots: int32 (T,) the new tokens' slots; mask, local_mask: boolean
            (B, 1, T, M) from `kv_cache.cache_masks` (local: the sliding window).
          key_positions: int32 (B, M) every slot's position (padding slots 0).

        Returns ((B, T, hidden), the updated cache).
        """
        del mask  # the window's local_mask and the entries' own rule cover every key
        q_latent, q, new_keys, cos, sin = self._project(x, positions)
        new = [write_slots(cache[0], new_keys[:, None], slots)]              # (B, 1, M, D)
        keys, window = new[0][:, 0], local_mask
        if self.compressor is not None:
            n = (len(cache) - 1) // 2
            projections = [write_slots(c, p[:, None], slots)
                           for c, p in zip(cache[1:1 + n], self._projections(x))]
            c_keys, c_mask, entries = self._cached_entries(
                x, q_latent, cos, sin, positions, slots, [p[:, 0] for p in projections],
                cache[1 + n:], key_positions)
            new += projections + entries
            keys = tf.concat([keys, tf.cast(c_keys, keys.dtype)], axis=1)   # (B, M + E, D)
            window = tf.concat([window, c_mask[:, None]], axis=-1)          # (B, 1, T, M + E)
        return self._attend(x, q, cos, sin, keys, window)[0], tuple(new)

    def cache_shape(self, batch: int, max_length: int) -> tuple:
        """Shapes of this layer's cache (see `call_cached`)."""
        compressors = [c for c in (self.compressor, self.index_compressor) if c is not None]
        return ((batch, 1, max_length, self.head_dim),
                *((batch, 1, max_length, 2 * c.width) for c in compressors),
                *((batch, 1, max_length, c.head_dim) for c in compressors))

    def get_config(self):
        s = self.rotary.scaling
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "num_heads": self.num_heads, "head_dim": self.head_dim,
                "rope_head_dim": self.rope_head_dim, "q_lora_rank": self.q_lora_rank,
                "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
                "sliding_window": self.sliding_window, "layer_type": self.layer_type,
                "compress_rate": self.compress_rate, "rope_theta": self.rope_theta,
                "rope_scaling": s.to_dict() if s else None,
                "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
                "index_topk": self.index_topk, "norm_eps": self.norm_eps,
                "initializer_range": self.initializer_range}
