"""Per-row token sampling: greedy, temperature, top-k, top-p, with per-row seeds.

Every option is a (B,) tensor, so the requests that TF Serving batches together
keep their own settings, and a row's draw depends only on its own seed and step:
the same seed gives the same text whatever else is in the batch.

    temperature <= 0  greedy (argmax)
    top_k > 0         keep the k most likely tokens (0 = off)
    top_p < 1         keep the smallest set whose probability reaches top_p
                      (applied after top-k, as Hugging Face does)

Sampling is the Gumbel-max trick on the filtered logits, with noise from a
counter-based integer hash of (seed, step, token id) (`_row_noise`). A negative seed (the default
everywhere) is replaced once per request by `resolve_seeds` with a fresh one drawn in the
graph, so unseeded requests differ while a given seed stays reproducible.

Example:
    >>> logits = tf.constant([[0.0, 3.0, 1.0]])
    >>> ones = tf.ones([1])
    >>> sample_tokens(logits, 0.0 * ones, tf.zeros([1], tf.int32), ones,
    ...               tf.zeros([1], tf.int32), 0).numpy().tolist()
    [1]
"""

from __future__ import annotations

import tensorflow as tf

NEG_INF = -1e30


def resolve_seeds(seed) -> tf.Tensor:
    """int32 (B,) `seed` with every negative entry replaced by a fresh random seed.

    The draw is a stateful random op whose kernel seeds itself from the OS (seed and
    seed2 0), not from a graph seed: two processes serving one SavedModel, or one
    restarted, draw different seeds. Under `enable_op_determinism` (a training process)
    TensorFlow refuses such ops, so a graph traced then draws from a fixed key instead:
    unseeded requests are then reproducible, as determinism asks.
    """
    from tensorflow.python.framework import config as tf_config

    seed = tf.convert_to_tensor(seed, tf.int32)
    if tf_config.is_op_determinism_enabled():
        fresh = tf.random.stateless_uniform(tf.shape(seed), seed=[0, 0], minval=0,
                                            maxval=2**31 - 1, dtype=tf.int32)
    else:
        fresh = tf.raw_ops.RandomUniformInt(shape=tf.shape(seed), minval=tf.constant(0),
                                            maxval=tf.constant(2**31 - 1), seed=0, seed2=0)
    return tf.where(seed < 0, fresh, seed)


def filter_logits(logits: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
    """`logits` (B, V) with the tokens that top-k / top-p exclude set to -1e30.

    Args:
      logits: float32 (B, V), already divided by the temperature.
      top_k: int32 (B,), 0 = off.
      top_p: float32 (B,), >= 1 = off.
    """
    vocab = tf.shape(logits)[-1]
    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")                 # (B, V)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)                   # (B,)
    ranks = tf.range(vocab)[tf.newaxis, :]                                     # (1, V)
    ordered = tf.where(ranks < k[:, tf.newaxis], ordered, NEG_INF)
    probs = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)                         # mass above
    keep = (before < top_p[:, tf.newaxis]) | (ranks == 0) | (top_p[:, tf.newaxis] >= 1.0)
    count = tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1)                    # (B,)
    count = tf.minimum(count, k)
    threshold = tf.gather(ordered, count - 1, batch_dims=1)                    # (B,)
    return tf.where(logits >= threshold[:, tf.newaxis], logits, NEG_INF)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (Wellons' "triple32", near-ideal avalanche): uint32 in,
    uint32 out."""
    for shift, mult in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift))
        x = x * tf.constant(mult, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 14))


def _row_noise(seed: tf.Tensor, step, vocab) -> tf.Tensor:
    """Gumbel noise (B, V), row b drawn from (seed[b], step) alone.

    Counter-based, from integer hashing: the same bits eagerly, in a graph and inside
    an XLA computation (TensorFlow's stateless random ops give other numbers under
    XLA), so a seed gives the same text whether or not the decode loop is compiled."""
    step = tf.cast(tf.cast(step, tf.int32), tf.uint32)
    key = _mix(tf.bitwise.bitwise_xor(_mix(tf.cast(seed, tf.uint32)),
                                      step * tf.constant(0x9E3779B9, tf.uint32)))  # (B,)
    index = tf.cast(tf.range(vocab), tf.uint32) * tf.constant(0x85EBCA6B, tf.uint32)
    bits = _mix(tf.bitwise.bitwise_xor(key[:, tf.newaxis], index[tf.newaxis]))    # (B, V)
    u = (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * 2.0 ** -24  # (0, 1)
    return -tf.math.log(-tf.math.log(u))


def sample_tokens(logits, temperature, top_k, top_p, seed, step) -> tf.Tensor:
    """int32 (B,) next tokens from float32 logits (B, V).

    Args:
      logits: float32 (B, V) next-token logits.
      temperature: float32 (B,); <= 0 is greedy.
      top_k: int32 (B,); 0 = off.
      top_p: float32 (B,); >= 1 = off.
      seed: int32 (B,) per-row seeds (>= 0; see `resolve_seeds`).
      step: int scalar, the index of the token being drawn.
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def draw():
        scaled = logits / tf.maximum(temperature, 1e-6)[:, tf.newaxis]
        filtered = filter_logits(scaled, top_k, top_p)
        noise = _row_noise(seed, step, tf.shape(logits)[-1])
        drawn = tf.argmax(filtered + noise, axis=-1, output_type=tf.int32)
        return tf.where(temperature > 0, drawn, greedy)

    # An all-greedy batch skips the sort and the noise (most of a small model's step).
    return tf.cond(tf.reduce_any(temperature > 0), draw, lambda: greedy)
