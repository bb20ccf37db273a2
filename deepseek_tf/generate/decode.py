"""The compiled decode loop: prefill, then one token per `tf.while_loop` step.

`generate_ids` is a plain TensorFlow function of tensors, so the same graph runs
eagerly, inside `Generator`'s `tf.function`, and as a SavedModel signature.

Batching: prompts come right-padded with their lengths (the natural layout of a
request) and are moved to the right edge (LEFT padding) for the cache: every row
then writes the same cache slot at each step, and a row with `pad` padding slots
gives slot `s` the position `s - pad`, so each row gets the tokens it would get
alone. Outputs are right-padded with `pad_id`; a row's stop token is included in
its output (as Hugging Face's `generate` does) and ends that row.

Example:
    >>> gen = Generator(model, max_length=64, stop_ids=(257,), pad_id=258)
    >>> ids, n = gen.generate(tf.constant([[256, 72, 105]]), tf.constant([3]),
    ...                       max_new_tokens=tf.constant([8]))
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deepseek_tf.generate.sampling import resolve_seeds, sample_tokens
from deepseek_tf.scoring import length_mask, score_tokens

#: Default `max_new_tokens` per kind of use: the CLI, evaluate and the Python API (offline
#: work a user watches) and the SavedModel signatures (`export --max_new_tokens`: a
#: server's default bounds each request's latency).
MAX_NEW_TOKENS = 128
SERVING_MAX_NEW_TOKENS = 64

#: The TensorSpecs of the sampling options (one value per row).
SAMPLING_SPECS = {
    "max_new_tokens": tf.TensorSpec([None], tf.int32, name="max_new_tokens"),
    "temperature": tf.TensorSpec([None], tf.float32, name="temperature"),
    "top_k": tf.TensorSpec([None], tf.int32, name="top_k"),
    "top_p": tf.TensorSpec([None], tf.float32, name="top_p"),
    "seed": tf.TensorSpec([None], tf.int32, name="seed"),
}
IDS_SPECS = {"input_ids": tf.TensorSpec([None, None], tf.int32, name="input_ids"),
             "lengths": tf.TensorSpec([None], tf.int32, name="lengths")}


def left_align(ids: tf.Tensor, lengths: tf.Tensor, fill: int = 0) -> tf.Tensor:
    """Right-padded (B, T) ids -> the same rows moved to the right edge."""
    t = tf.shape(ids)[1]
    src = tf.range(t)[tf.newaxis, :] - (t - lengths)[:, tf.newaxis]            # (B, T)
    moved = tf.gather(ids, tf.maximum(src, 0), batch_dims=1)
    return tf.where(src >= 0, moved, fill)


def normalize_stops(stop_ids) -> tuple[tuple[int, ...], ...]:
    """Stops as token-id sequences: an int is a one-token stop, a sequence a multi-token
    one (e.g. `<|im_end|>` spelled in bytes)."""
    out = []
    for s in stop_ids:
        seq = (int(s),) if isinstance(s, (int, np.integer)) else tuple(int(i) for i in s)
        if seq:
            out.append(seq)
    return tuple(dict.fromkeys(out))


def stop_table(stops) -> tuple[np.ndarray, int]:
    """(int32 (S, L) stop sequences right-aligned, -1 before each, L) for the decode
    loop; a table of one never-matching row when there are no stops."""
    stops = normalize_stops(stops) or ((-1,),)
    width = max(len(s) for s in stops)
    table = np.full((len(stops), width), -1, np.int32)
    for i, s in enumerate(stops):
        table[i, width - len(s):] = s
    return table, width


def stop_match(recent: tf.Tensor, table: np.ndarray) -> tf.Tensor:
    """int32 (B,) length of the longest stop that `recent` (B, L), a row's newest tokens
    right-aligned, ends with; 0 if none."""
    care = table >= 0                                                           # (S, L)
    same = tf.equal(recent[:, tf.newaxis, :], table[tf.newaxis]) | ~care[tf.newaxis]
    hit = tf.reduce_all(same, axis=2)                                           # (B, S)
    lengths = tf.constant(care.sum(axis=1), tf.int32)                           # (S,)
    return tf.reduce_max(tf.where(hit, lengths[tf.newaxis], 0), axis=1)


def stop_suffix(ids, lengths, stops) -> tf.Tensor:
    """int32 (B,) tokens at the end of each generated row (ids (B, N), lengths (B,))
    that form a stop (to cut them from the reply text)."""
    table, width = stop_table(stops)
    idx = lengths[:, tf.newaxis] - width + tf.range(width)[tf.newaxis, :]       # (B, L)
    recent = tf.gather(ids, tf.maximum(idx, 0), batch_dims=1)
    return stop_match(tf.where(idx >= 0, recent, -2), table)


def check_ids(ids, lengths, vocab_size: int, max_length: int | None = None) -> list:
    """In-graph checks of a (B, T) id batch: INVALID_ARGUMENT with what to change."""
    t = tf.shape(ids)[1]
    checks = [
        tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(ids)[0], message=(
            "lengths must have one entry per row of input_ids")),
        tf.debugging.assert_greater_equal(lengths, 1, message=(
            "every prompt needs at least one token (lengths >= 1)")),
        tf.debugging.assert_less_equal(lengths, t, message=(
            "a length exceeds the width of input_ids; send lengths <= input_ids.shape[1]")),
        tf.debugging.assert_non_negative(ids, message="token ids must be >= 0"),
        tf.debugging.assert_less(ids, vocab_size, message=(
            f"token ids must be < the vocabulary size {vocab_size}")),
    ]
    if max_length is not None:
        checks.append(tf.debugging.assert_less(t, max_length, message=(
            f"the prompt is longer than the cache allows: prompts may have at most "
            f"{max_length - 1} tokens; shorten the prompt or export with a larger "
            f"--max_length")))
    return checks


def check_sampling(t, max_new_tokens, temperature, top_k, top_p, seed, max_length: int) -> list:
    """In-graph checks of the per-row sampling options (INVALID_ARGUMENT messages)."""
    room = max_length - t
    return [
        tf.debugging.assert_greater_equal(max_new_tokens, 1, message=(
            "max_new_tokens must be >= 1")),
        tf.debugging.assert_less_equal(max_new_tokens, room, message=(
            f"max_new_tokens too large: prompt + max_new_tokens must fit the cache of "
            f"{max_length} tokens; lower max_new_tokens or shorten the prompt")),
        tf.debugging.assert_non_negative(temperature, message="temperature must be >= 0"),
        tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0 (0 = off)"),
        tf.debugging.assert_greater(top_p, 0.0, message="top_p must be > 0 and <= 1"),
        tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be > 0 and <= 1"),
        *[tf.debugging.assert_equal(tf.shape(x), tf.shape(seed), message=(
            "every sampling option needs one value per prompt"))
          for x in (max_new_tokens, temperature, top_k, top_p)],
    ]


def streamer_rows(streamer, step, tokens, done) -> np.ndarray:
    """Calls `streamer(step, tokens, done)` with numpy values; bool (B,) rows it ends (its
    return value, None = none)."""
    ended = streamer(step.numpy(), tokens.numpy(), done.numpy())
    return np.zeros(tokens.shape, bool) if ended is None else np.asarray(ended, bool)


def decode_step(model, absorb=True, jit_compile=False):
    """`(tokens (B, 1), cache, start, pad) -> (logits, cache)`: one decode step, XLA-
    compiled (static dropless MoE buffers) or not."""
    def step(tokens, cache, start, pad):
        return model.call_cached(tokens, cache, start, pad, absorb=absorb,
                                 static_moe=jit_compile)
    return tf.function(step, jit_compile=True, autograph=False) if jit_compile else step


def prefill_widths(max_length: int, up_to: int | None = None) -> np.ndarray:
    """int32 prompt widths a compiled prefill is built for: the powers of two from 16 that
    leave a cache slot for a new token (and are <= `up_to`). A prompt is left-padded up
    to the next one, so XLA compiles at most one shape per width."""
    top = max_length - 1 if up_to is None else min(max_length - 1, up_to)
    return np.array([w for w in (2 ** k for k in range(4, 31)) if w <= top], np.int32)


def prefill_step(model, max_length: int, absorb=True):
    """`(ids (B, W), pad) -> (last logits, cache)`: the prefill XLA-compiled, once per
    width W (static MoE buffers: every expert sees every prompt token, dropless)."""
    def prefill(ids, pad):
        return model.prefill(ids, max_length, pad, absorb=absorb, static_moe=True)
    return tf.function(prefill, jit_compile=True, autograph=False)


def bucketed_prefill(model, ids, pad, limit, max_length: int, absorb=True, prefill_fn=None,
                     up_to: int = 0):
    """(last logits (B, V), cache, width, pad) of left-aligned prompts `ids` (B, T).

    With `prefill_fn` (`prefill_step`), the prompts are left-padded to the next of
    `prefill_widths(max_length, up_to)` and prefilled by it when there is one and it
    still leaves `limit` new tokens room in the cache; otherwise (and without it)
    `model.prefill` runs at width T. Either way each row's tokens keep their positions
    (slot - pad), so decoding goes on from slot `width` with the returned `pad`.
    """
    t = tf.shape(ids)[1]
    widths = prefill_widths(max_length, up_to)

    def plain():
        last, cache = model.prefill(ids, max_length, pad, absorb=absorb)
        return last, cache, t, pad

    if prefill_fn is None or widths.size == 0:
        return plain()
    width = tf.gather(widths, tf.minimum(tf.searchsorted(widths, t[tf.newaxis])[0],
                                         widths.size - 1))
    fits = tf.logical_and(t <= width, width + limit <= max_length)

    def compiled():
        extra = width - t
        last, cache = prefill_fn(tf.pad(ids, [[0, 0], [extra, 0]]), pad + extra)
        return last, cache, width, pad + extra

    return tf.cond(fits, compiled, plain)


def generate_ids(model, input_ids, lengths, max_new_tokens, temperature, top_k, top_p,
                 seed, *, max_length: int, stop_ids=(), pad_id: int = 0, absorb=True,
                 jit_compile=False, streamer=None, decode_fn=None, prefill_fn=None,
                 prefill_jit: int = 0):
    """Generates after each prompt; returns (ids (B, N) right-padded, lengths (B,)).

    Args:
      model: a `DeepSeekCausalLM`.
      input_ids: int32 (B, T) right-padded prompts; lengths: int32 (B,).
      max_new_tokens, temperature, top_k, top_p, seed: (B,) per-row options
        (see `sampling.sample_tokens`); a negative seed draws a fresh one in the graph.
      max_length: the static cache length M; T + max_new_tokens must be <= M.
      stop_ids: what ends a row (included in its output): token ids, or id sequences
        for multi-token stops (see `normalize_stops`).
      pad_id: fills the output after a row ended.
      absorb: MLA decodes in latent space.
      jit_compile: compile the decode loop with XLA (static-shape MoE buffers): the whole
        `tf.while_loop` (steps, sampling, stops) as one XLA computation, or with a
        `streamer` (a Python callback, which XLA cannot hold) each step alone.
      streamer: optional Python callable `(step, tokens (B,), done (B,))` run by
        `tf.py_function` after each step (not for export); it may return a bool (B,)
        array of rows to end now (a server's cancelled requests), or None.
      decode_fn: the decode step `(tokens, cache, start, pad) -> (logits, cache)` to use
        (a `Generator` passes one compiled function, so XLA compiles it once).
      prefill_jit: the widest prompt (rounded up to a power of two from 16) to prefill
        with XLA (`bucketed_prefill`, with `prefill_fn` or a `prefill_step` of its own);
        0 = none: the uncompiled prefill at the prompt's own width (dropless MoE by
        expert load), which wins on long prompts (larger matmuls are faster in oneDNN
        than in XLA's CPU kernels here).
    """
    input_ids = tf.convert_to_tensor(input_ids, tf.int32)
    b, t = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
    checks = check_ids(input_ids, lengths, model.config.vocab_size, max_length)
    checks += check_sampling(t, max_new_tokens, temperature, top_k, top_p, seed, max_length)
    with tf.control_dependencies(checks):  # nothing runs on a refused request
        input_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed = (
            tf.identity(x) for x in (input_ids, lengths, max_new_tokens, temperature, top_k,
                                     top_p, seed))
    seed = resolve_seeds(seed)
    table, width = stop_table(stop_ids)
    limit = tf.reduce_max(max_new_tokens)
    if prefill_jit and prefill_fn is None:
        prefill_fn = prefill_step(model, max_length, absorb)
    last, cache, t, pad = bucketed_prefill(model, left_align(input_ids, lengths), t - lengths,
                                           limit, max_length, absorb, prefill_fn, prefill_jit)
    draw = lambda lg, i: sample_tokens(lg, temperature, top_k, top_p, seed, i)  # noqa: E731
    decode = decode_fn or decode_step(model, absorb, jit_compile)

    def body(i, token, done, count, recent, cache, out):
        emit = tf.where(done, pad_id, token)                                   # (B,)
        out = tf.where(tf.range(max_length)[tf.newaxis] == i, emit[:, tf.newaxis], out)
        count += tf.cast(tf.logical_not(done), tf.int32)
        recent = tf.concat([recent[:, 1:], token[:, tf.newaxis]], axis=1)      # (B, L)
        done = done | (stop_match(recent, table) > 0) | (count >= max_new_tokens)
        if streamer is not None:  # it may end rows (a cancelled request)
            ended = tf.py_function(lambda *a: streamer_rows(streamer, *a), [i, emit, done],
                                   tf.bool)
            done = done | tf.reshape(ended, [b])

        def step():
            lg, c = decode(emit[:, None], cache, t + i, pad)
            return draw(lg[:, 0], i + 1), c

        more = tf.logical_and(i + 1 < limit, tf.logical_not(tf.reduce_all(done)))
        token, cache = tf.cond(more, step, lambda: (token, cache))
        return i + 1, token, done, count, recent, cache, out

    def loop(*state):
        return tf.while_loop(lambda i, tok, done, *_: tf.logical_and(
            i < limit, tf.logical_not(tf.reduce_all(done))), body, state)

    if jit_compile and streamer is None:  # the whole loop is one XLA computation
        loop = tf.function(loop, jit_compile=True, autograph=False)
    state = (tf.constant(0), draw(last, 0), tf.zeros([b], tf.bool),
             tf.zeros([b], tf.int32), tf.fill([b, width], -2), cache,
             tf.fill([b, max_length], pad_id))                                 # out (B, M)
    steps, _, _, count, _, _, out = loop(*state)
    return out[:, :steps], count


def score_ids(model, input_ids, lengths):
    """Per-token log-probabilities (B, T) of right-padded ids: entry t is
    log p(ids[t] | ids[:t]); 0 at t = 0 and past each row's length. Returns
    (log_probs, total (B,))."""
    input_ids = tf.convert_to_tensor(input_ids, tf.int32)
    with tf.control_dependencies(check_ids(input_ids, lengths, model.config.vocab_size)):
        input_ids = tf.identity(input_ids)
    log_probs, _ = score_tokens(model, input_ids, length_mask(lengths, tf.shape(input_ids)[1]))
    return log_probs, tf.reduce_sum(log_probs, axis=1)


class Generator(tf.Module):
    """A model with a fixed cache length and stop tokens, compiled once.

    Args:
      model: a `DeepSeekCausalLM`.
      max_length: the static cache length (prompt + new tokens).
      stop_ids: token ids (or id sequences) that end a row.
      pad_id: output padding.
      absorb: MLA decodes in latent space (False: the naive reference path).
      jit_compile: XLA-compile each decode step (see `generate_ids`).
      prefill_jit: the widest prompt to prefill with XLA (0 = none; see
        `generate_ids`); an attribute `pick_generator` may change.

    Example:
        >>> gen = Generator(model, max_length=64, stop_ids=(257,), pad_id=258)
        >>> ids, n = gen.generate([[256, 72]], [2], max_new_tokens=[8])
    """

    def __init__(self, model, max_length: int, stop_ids=(), pad_id: int = 0, absorb=True,
                 jit_compile=False, prefill_jit: int = 0):
        super().__init__()
        self.model, self.max_length = model, int(max_length)
        self.stop_ids, self.pad_id, self.absorb = normalize_stops(stop_ids), pad_id, absorb
        self.jit_compile, self.prefill_jit = bool(jit_compile), int(prefill_jit)
        self._decode = decode_step(model, absorb, self.jit_compile)  # shared by every trace
        self._prefill = prefill_step(model, self.max_length, absorb)  # if prefill_jit
        self._compiled = {}

    def _fn(self, streamer=None):
        key = (id(streamer), self.prefill_jit)
        if key not in self._compiled:
            prefill, up_to = self._prefill, self.prefill_jit

            def fn(input_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed):
                return generate_ids(self.model, input_ids, lengths, max_new_tokens, temperature,
                                    top_k, top_p, seed, max_length=self.max_length,
                                    stop_ids=self.stop_ids, pad_id=self.pad_id,
                                    absorb=self.absorb, jit_compile=self.jit_compile,
                                    streamer=streamer, decode_fn=self._decode,
                                    prefill_fn=prefill, prefill_jit=up_to)
            self._compiled[key] = tf.function(
                fn, autograph=False,
                input_signature=[*IDS_SPECS.values(), *SAMPLING_SPECS.values()])
        return self._compiled[key]

    def generate(self, input_ids, lengths, max_new_tokens=None, temperature=None, top_k=None,
                 top_p=None, seed=None, streamer=None):
        """(ids (B, N), lengths (B,)) as numpy-convertible tensors; options default to
        greedy with MAX_NEW_TOKENS (at most what the cache holds) and a fresh seed, and
        accept scalars (broadcast to the batch)."""
        input_ids = tf.convert_to_tensor(input_ids, tf.int32)
        b = int(input_ids.shape[0])

        def row(x, default, dtype):
            x = default if x is None else x
            return tf.broadcast_to(tf.cast(x, dtype), [b])

        room = self.max_length - int(input_ids.shape[1])
        args = (row(max_new_tokens, max(1, min(MAX_NEW_TOKENS, room)), tf.int32),
                row(temperature, 0.0, tf.float32), row(top_k, 0, tf.int32),
                row(top_p, 1.0, tf.float32), row(seed, -1, tf.int32))
        return self._fn(streamer)(input_ids, tf.convert_to_tensor(lengths, tf.int32), *args)
