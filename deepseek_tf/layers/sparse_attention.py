"""Top-k sparse attention over gathered keys: the core of DeepSeek Sparse Attention.

Each query attends only to its K selected keys, gathered from one key tensor whose
rows also serve as values (MLA's absorbed form: the normalised latent with the shared
RoPE key beside it, queries in the same space). The work is O(T K), but a plain
gather materialises every query's keys at once, (T, K, C): at T = 8k, K = 256 and
C = 96 that is 0.8 GB per copy, and automatic differentiation keeps it and writes
several more in the backward pass, so the layer was bound by memory traffic.

`gathered_attention(..., chunk=N)` walks the queries N at a time, so one chunk's
gathered keys stay in cache; it keeps only the probabilities (T, H, K) for the
backward pass, which regathers each chunk (a custom gradient) and scatters the key
gradients straight into one (S, C) float32 accumulator. `chunk=None` is the same
arithmetic in one piece, differentiated by TensorFlow: what cached decoding and the
exports use (no loop, no custom gradient in their graphs).

Example:
    >>> q, latent, rope = tf.ones((1, 6, 2, 8)), tf.ones((1, 6, 6)), tf.ones((1, 6, 2))
    >>> idx = tf.zeros((1, 6, 3), tf.int32)
    >>> ctx, probs = gathered_attention(q, (latent, rope), idx, tf.ones((1, 6, 3), bool),
    ...                                 0.5, chunk=4)
    >>> ctx.shape, probs.shape
    (TensorShape([1, 6, 2, 8]), TensorShape([1, 2, 6, 3]))
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.layers.attention import masked_softmax

CHUNK = 256  # queries per step of the chunked path (bench/dsa.py measured 128-512 alike)


def attend_gathered(q, kvs, idx, valid, scale):
    """One piece: q (N, H, C), kvs a tuple of (M, C_i) whose concatenation is the keys
    (M, C), idx int32 (N, K) rows of them, valid (N, K) -> (context (N, H, C) =
    probs . kv[idx], float32 probs (N, H, K)). Only the selected rows are joined."""
    sel = tf.concat([tf.gather(kv, idx) for kv in kvs], -1)            # (N, K, C)
    scores = tf.einsum("nhc,nkc->nhk", q, sel)
    probs = masked_softmax(scores * scale, tf.expand_dims(valid, 1))   # (N, H, K)
    return tf.einsum("nhk,nkc->nhc", tf.cast(probs, sel.dtype), sel), probs


def gathered_attention(q, kvs, idx, valid, scale: float, chunk: int | None = CHUNK):
    """Softmax attention of each query over its gathered keys.

    Args:
      q: (B, T, H, C) queries in the key space.
      kvs: tuple of (B, S, C_i) whose concatenation (B, S, C) is the keys, which are
        also the values (MLA: the latent and the RoPE key).
      idx: int32 (B, T, K) the key positions each query attends to.
      valid: boolean (B, T, K) which of them it may see (False -> probability 0).
      scale: the softmax scale.
      chunk: queries per step (None: all at once).

    Returns:
      (context (B, T, H, C), float32 probs (B, H, T, K)).
    """
    b, t, h, c = tf.shape(q)[0], tf.shape(q)[1], q.shape[2], q.shape[3]
    s, k = tf.shape(kvs[0])[1], tf.shape(idx)[2]
    rows = idx + tf.reshape(tf.range(b) * s, [-1, 1, 1])               # rows of (B*S, C)
    args = (tf.reshape(q, [b * t, h, c]), tf.reshape(rows, [b * t, k]),
            tf.reshape(valid, [b * t, k]))
    flat = [tf.reshape(kv, [b * s, kv.shape[-1]]) for kv in kvs]
    if chunk is None:  # decoding: gather the few selected rows of each part
        ctx, probs = attend_gathered(args[0], flat, *args[1:], scale)
    else:
        ctx, probs = _chunked(args[0], tf.concat(flat, -1), *args[1:], scale, chunk)
    probs = tf.transpose(tf.reshape(probs, [b, t, h, k]), [0, 2, 1, 3])
    return tf.reshape(ctx, [b, t, h, c]), probs


def _pad_chunks(x, n_chunks, chunk, value=0):
    """(N, ...) -> (n_chunks, chunk, ...), the tail padded with `value`."""
    pad = n_chunks * chunk - tf.shape(x)[0]
    x = tf.pad(x, [[0, pad]] + [[0, 0]] * (x.shape.rank - 1), constant_values=value)
    return tf.reshape(x, tf.concat([[n_chunks, chunk], tf.shape(x)[1:]], 0))


def _unchunk(x, n):
    """(n_chunks, chunk, ...) -> the first n rows of (n_chunks * chunk, ...)."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))[:n]


def _chunked(q, kv, idx, valid, scale, chunk):
    """`attend_gathered` chunk by chunk, with the backward pass described above."""
    n = tf.shape(q)[0]
    m = (n + chunk - 1) // chunk
    idx_c, valid_c = _pad_chunks(idx, m, chunk), _pad_chunks(valid, m, chunk, False)

    @tf.custom_gradient
    def run(q, kv):
        q_c = _pad_chunks(q, m, chunk)                                 # (m, chunk, H, C)
        ctx_c, probs_c = tf.map_fn(
            lambda a: attend_gathered(a[0], (kv,), a[1], a[2], scale), (q_c, idx_c, valid_c),
            fn_output_signature=(q.dtype, tf.float32), parallel_iterations=1)

        def grad(d_ctx, d_probs):
            d_ctx_c = _pad_chunks(d_ctx, m, chunk)
            d_probs_c = (tf.zeros_like(probs_c) if d_probs is None
                         else _pad_chunks(tf.cast(d_probs, tf.float32), m, chunk))

            def step(i, d_kv, d_q):
                sel = tf.gather(kv, idx_c[i])                          # (chunk, K, C)
                p, dc = probs_c[i], d_ctx_c[i]
                dp = tf.cast(tf.einsum("nhc,nkc->nhk", dc, sel), tf.float32) + d_probs_c[i]
                ds = p * (dp - tf.reduce_sum(p * dp, -1, keepdims=True))  # softmax backward
                ds = tf.cast(tf.where(tf.expand_dims(valid_c[i], 1), ds * scale, 0.0), q.dtype)
                d_q = d_q.write(i, tf.einsum("nhk,nkc->nhc", ds, sel))
                # d sel = p^T d_ctx + ds^T q, as one matmul over the stacked heads.
                d_sel = tf.einsum("nhk,nhc->nkc", tf.concat([tf.cast(p, q.dtype), ds], 1),
                                  tf.concat([dc, q_c[i]], 1))          # (chunk, K, C)
                d_kv = tf.tensor_scatter_nd_add(d_kv, tf.expand_dims(idx_c[i], -1),
                                                tf.cast(d_sel, tf.float32))
                return i + 1, d_kv, d_q

            _, d_kv, d_q = tf.while_loop(
                lambda i, *_: i < m, step,
                (tf.constant(0), tf.zeros(tf.shape(kv), tf.float32),
                 tf.TensorArray(q.dtype, size=m, element_shape=q_c.shape[1:])))
            return _unchunk(d_q.stack(), n), tf.cast(d_kv, kv.dtype)

        return (_unchunk(ctx_c, n), _unchunk(probs_c, n)), grad

    return run(q, kv)
