"""Static-size KV cache primitives shared by the attention layers.

A layer's cache is a pair of tensors laid out (B, heads, max_length, width), the
layout LiteRT-LM expects (the context length on axis 2):

    GQA / hybrid   keys (B, K, M, D) and values (B, K, M, D)
    MLA            the normalised latent (B, 1, M, kv_lora_rank) and the rotated
                   shared RoPE key (B, 1, M, qk_rope_head_dim)

Prompts are LEFT-padded: every row of a batch writes the same cache slots at the
same step, and a row with `pad` padding slots gives the token in slot `s` the
position `s - pad`. `cache_masks` turns (slots, pad) into the boolean masks that
exclude padding and future slots, so a batch gives each row the result it would
give alone.

Example:
    >>> cache = tf.zeros((1, 2, 8, 4))
    >>> new = tf.ones((1, 2, 3, 4))
    >>> write_slots(cache, new, tf.range(2, 5))[0, 0, :, 0].numpy().tolist()
    [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import tensorflow as tf


def write_slots(cache: tf.Tensor | None, new: tf.Tensor, slots: tf.Tensor) -> tf.Tensor:
    """`cache` (B, H, M, D) with slots `slots` (T,) replaced by `new` (B, H, T, D).

    A one-hot scatter (ONE_HOT + matmul + SELECT), which runs as builtin ops in
    TFLite too; every other slot keeps its value exactly. `cache=None` stands for an
    empty cache exactly as long as `new` (a prompt's prefill, see
    `DeepSeekCausalLM.prefill`): `new` is the cache.
    """
    if cache is None:
        return new
    onehot = tf.one_hot(slots, tf.shape(cache)[2], dtype=new.dtype)      # (T, M)
    scattered = tf.einsum("bhtd,tm->bhmd", new, onehot)                  # (B, H, M, D)
    hit = tf.reshape(tf.reduce_max(onehot, axis=0) > 0, [1, 1, -1, 1])   # (1, 1, M, 1)
    return tf.where(hit, scattered, tf.cast(cache, new.dtype))


def cache_masks(slots: tf.Tensor, pad: tf.Tensor, max_length, sliding_window: int = 0):
    """Boolean masks (B, 1, T, M) of which cache slots each query may attend.

    Args:
      slots: int32 (T,) the cache slots of this call's tokens (ascending).
      pad: int32 (B,) left-padding slots of each row (slots < pad are padding).
      max_length: M, the cache length.
      sliding_window: > 0 also returns the local mask (the last `sliding_window`
        slots up to the query's own).

    Returns (mask, local_mask or None).
    """
    keys = tf.range(max_length)[tf.newaxis, :]                          # (1, M)
    q = tf.expand_dims(slots, 1)                                        # (T, 1)
    causal = keys <= q                                                  # (T, M)
    real = tf.expand_dims(keys, 0) >= tf.reshape(pad, [-1, 1, 1])      # (B, 1, M)
    mask = tf.expand_dims(tf.logical_and(real, tf.expand_dims(causal, 0)), 1)  # (B, 1, T, M)
    if not sliding_window:
        return mask, None
    near = tf.expand_dims(tf.expand_dims(q - keys < sliding_window, 0), 0)   # (1, 1, T, M)
    return mask, tf.logical_and(mask, near)


def slot_positions(slots: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
    """int32 (B, T) RoPE positions of slots `slots` (T,) in rows padded by `pad` (B,)."""
    return tf.maximum(tf.expand_dims(slots, 0) - tf.expand_dims(pad, 1), 0)
