"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): the residual stream of a
token is `hc_mult` parallel streams (B, T, N, d).

Before each attention or MLP, `HyperConnection` reads the streams (flattened,
RMS-normalised without weight, one linear map) and returns three weights:
`pre` (N) collapses the streams into the sub-layer's input, `post` (N) spreads its
output back over the streams, and `comb` (N, N), made doubly stochastic by
Sinkhorn-Knopp, mixes the streams into the residual: `streams' = post * out +
comb^T @ streams` (`hyper_residual`). `HyperHead` collapses the streams once more
before the final norm. All in float32, as Hugging Face's `DeepseekV4HyperConnection`
and `DeepseekV4HyperHead` (whose weight names, transposed, these are).

Example:
    >>> hc = HyperConnection(hidden_size=8, hc_mult=2)
    >>> post, comb, x = hc(tf.ones((1, 3, 2, 8)))
    >>> x.shape, comb.shape
    (TensorShape([1, 3, 8]), TensorShape([1, 3, 2, 2]))
"""

from __future__ import annotations

import keras
import tensorflow as tf


def unweighted_rms_norm(x: tf.Tensor, eps: float) -> tf.Tensor:
    """`x / rms(x)` over the last axis, statistics in float32, in x's dtype."""
    ms = tf.reduce_mean(tf.square(tf.cast(x, tf.float32)), -1, keepdims=True)
    return x * tf.cast(tf.math.rsqrt(ms + eps), x.dtype)


def sinkhorn(m: tf.Tensor, iters: int, eps: float) -> tf.Tensor:
    """Alternately normalises the columns and rows of positive (..., N, N) matrices
    (columns first and last, `iters` column passes): nearly doubly stochastic.

    The passes run in a `tf.while_loop` (fixed trip count, so XLA and the gradient can
    stack them) rather than unrolled: the same ops in the same order, but a graph ~20x
    smaller here. Unrolled, the 20 passes were half of V4-tiny's XLA compile of the
    train step's forward + backward (44 -> 24 s) and 3 s of its tracing, at the same
    step time (16 x 256: 789 vs 791 ms without XLA) and decode speed."""
    m = m / (tf.reduce_sum(m, -2, keepdims=True) + eps)

    def rows_then_columns(i, m):
        m = m / (tf.reduce_sum(m, -1, keepdims=True) + eps)
        return i + 1, m / (tf.reduce_sum(m, -2, keepdims=True) + eps)

    _, m = tf.while_loop(lambda i, _: i < iters - 1, rows_then_columns, (tf.constant(0), m),
                         maximum_iterations=max(iters - 1, 0))
    return m


def hyper_residual(streams, out, post, comb):
    """The streams (B, T, N, d) after a sub-layer's output `out` (B, T, d):
    `post[n] * out + sum_m comb[m, n] * streams[m]`."""
    post, comb = tf.cast(post, streams.dtype), tf.cast(comb, streams.dtype)
    return (tf.expand_dims(post, -1) * tf.expand_dims(out, -2)
            + tf.einsum("btmn,btmd->btnd", comb, streams))


def _streams_mix(streams, kernel, eps):
    """(B, T, N*d) normalised, flattened streams times `kernel`, float32."""
    shape = tf.shape(streams)
    flat = tf.reshape(tf.cast(streams, tf.float32), tf.concat([shape[:2], [-1]], 0))
    return tf.matmul(unweighted_rms_norm(flat, eps), kernel)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class HyperConnection(keras.layers.Layer):
    """The pre/post/comb weights of one mHC site (before attention or the MLP).

    Args:
      hidden_size: width d of each stream.
      hc_mult: streams N.
      sinkhorn_iters: Sinkhorn-Knopp iterations of `comb`.
      hc_eps: added to `pre` and `comb` and to the Sinkhorn sums.
      norm_eps: epsilon of the streams' RMS normalisation.
      initializer_range: stddev of the normal initializer of `fn`.

    Call: streams (B, T, N, d) -> (post (B, T, N), comb (B, T, N, N) float32, the
    collapsed input (B, T, d) in the streams' dtype).

    Example: see the module docstring.
    """

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int = 20,
                 hc_eps: float = 1e-6, norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.sinkhorn_iters, self.hc_eps, self.norm_eps = sinkhorn_iters, hc_eps, norm_eps
        self.initializer_range = initializer_range

    def build(self, input_shape):
        n = self.hc_mult
        f32 = dict(dtype="float32", autocast=False)
        self.fn = self.add_weight(
            name="fn", shape=(n * self.hidden_size, (2 + n) * n), **f32,
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_range))
        self.base = self.add_weight(name="base", shape=((2 + n) * n,), initializer="zeros",
                                    **f32)
        self.scale = self.add_weight(name="scale", shape=(3,), initializer="ones", **f32)

    def call(self, streams):
        n = self.hc_mult
        mix = _streams_mix(streams, self.fn.value, self.norm_eps)           # (B, T, (2+N)N)
        pre_w, post_w, comb_w = tf.split(mix, [n, n, n * n], axis=-1)
        pre_b, post_b, comb_b = tf.split(self.base.value, [n, n, n * n])
        pre_s, post_s, comb_s = tf.unstack(self.scale.value)
        pre = tf.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps               # (B, T, N)
        post = 2.0 * tf.sigmoid(post_w * post_s + post_b)                   # (B, T, N)
        comb = tf.reshape(comb_w * comb_s + comb_b, tf.concat([tf.shape(mix)[:2], [n, n]], 0))
        comb = sinkhorn(tf.nn.softmax(comb, -1) + self.hc_eps, self.sinkhorn_iters,
                        self.hc_eps)                                        # (B, T, N, N)
        collapsed = tf.reduce_sum(tf.expand_dims(tf.cast(pre, streams.dtype), -1) * streams, 2)
        return post, comb, collapsed

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "hc_mult": self.hc_mult, "sinkhorn_iters": self.sinkhorn_iters,
                "hc_eps": self.hc_eps, "norm_eps": self.norm_eps,
                "initializer_range": self.initializer_range}


@keras.saving.register_keras_serializable(package="deepseek_tf")
class HyperHead(keras.layers.Layer):
    """Collapses the N streams (B, T, N, d) into (B, T, d) before the final norm.

    Args:
      hidden_size, hc_mult, hc_eps, norm_eps, initializer_range: as `HyperConnection`.

    Example:
        >>> HyperHead(hidden_size=8, hc_mult=2)(tf.ones((1, 3, 2, 8))).shape
        TensorShape([1, 3, 8])
    """

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float = 1e-6,
                 norm_eps: float = 1e-6, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.hc_eps, self.norm_eps, self.initializer_range = hc_eps, norm_eps, initializer_range

    def build(self, input_shape):
        n = self.hc_mult
        f32 = dict(dtype="float32", autocast=False)
        self.fn = self.add_weight(
            name="fn", shape=(n * self.hidden_size, n), **f32,
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_range))
        self.base = self.add_weight(name="base", shape=(n,), initializer="zeros", **f32)
        self.scale = self.add_weight(name="scale", shape=(1,), initializer="ones", **f32)

    def call(self, streams):
        mix = _streams_mix(streams, self.fn.value, self.norm_eps)           # (B, T, N)
        pre = tf.sigmoid(mix * self.scale.value + self.base.value) + self.hc_eps
        return tf.reduce_sum(tf.expand_dims(tf.cast(pre, streams.dtype), -1) * streams, 2)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "hc_mult": self.hc_mult, "hc_eps": self.hc_eps, "norm_eps": self.norm_eps,
                "initializer_range": self.initializer_range}
