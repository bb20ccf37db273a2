"""Batched generation over Python prompts, for the command line and evaluation.

Example:
    >>> results = run_batches(model, tok, [tok.encode("Hi", add_eos=False)], 64,
    ...                       stop_ids=(tok.eos_id,), max_new_tokens=16)
    >>> results[0]["completion"], results[0]["stop_reason"]
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.generate.decode import Generator, prefill_widths
from deepseek_tf.generate.text import cut_at_stop, strip_special


def assertion_text(error: tf.errors.OpError) -> str:
    """The message of a failed in-graph check (`tf.debugging.assert_*`)."""
    found = re.search(r"assertion failed: \[([^\]]*)\]", error.message)
    return found.group(1) if found else error.message.strip().splitlines()[0]


def pad_right(rows: list, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int32 (B, T) right-padded ids, int32 (B,) lengths) of a list of id arrays."""
    lengths = np.array([len(r) for r in rows], np.int32)
    ids = np.full((len(rows), int(lengths.max())), fill, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


def pick_generator(model, max_length: int, stop_ids=(), pad_id: int = 0, absorb=True,
                   log=print) -> Generator:
    """`--jit_compile=auto` for decoding: times generation from a one-token prompt with
    and without XLA on this machine (`autojit.median_times`) and returns the faster
    `Generator` (its compiled step is reused by the real run).

    Small models decode several times faster with XLA (fewer, fused kernels); machines
    and model sizes differ, so this is measured, not assumed. A cache of 2 tokens or
    fewer leaves no decode step to compile: no XLA, without timing.
    """
    from deepseek_tf.autojit import choose_xla, median_times

    def make(jit):
        return Generator(model, max_length, stop_ids, pad_id, absorb=absorb, jit_compile=jit)

    steps = min(16, max_length - 1)  # new tokens after a one-token prompt
    if steps < 2:
        log(f"jit_compile: auto -> false: a cache of {max_length} tokens leaves no decode "
            f"step to compile")
        return make(False)
    gens = {"no_xla": make(False), "xla": make(True)}
    prompt = np.ones((1, 1), np.int32)

    def run(name):  # greedy with no stop: always `steps` tokens
        return lambda: gens[name].generate(prompt, [1], max_new_tokens=steps, seed=0)[0].numpy()

    use, why = choose_xla(median_times({name: run(name) for name in gens}, rounds=2),
                          "decode", per=steps)
    log(f"jit_compile: auto -> {'true' if use else 'false'}: {why} per token")
    gen = gens["xla" if use else "no_xla"]
    if use:  # an XLA prefill only beside an XLA decode (a server then needs XLA anyway)
        gen.prefill_jit = pick_prefill(gen, log)
    return gen


#: Prompt widths `pick_prefill` times (those the cache holds).
PREFILL_PROBES = (128, 512)


def pick_prefill(gen: Generator, log=print) -> int:
    """The widest prompt `gen` should prefill with XLA (`Generator.prefill_jit`; 0 =
    none), timed on this machine: the prefill alone, with and without XLA, at each of
    `PREFILL_PROBES` the cache holds, widest last, while XLA stays faster. XLA wins on
    short prompts (fewer, fused kernels) and can lose on long ones (oneDNN's larger
    matmuls; static MoE buffers give every expert every token); if it wins at the
    widest probe it is used for every width. The probe's compilations are the real
    run's (the same compiled prefill)."""
    from deepseek_tf.autojit import choose_xla, median_times

    widths = [w for w in PREFILL_PROBES if w in prefill_widths(gen.max_length)]
    plain = tf.function(lambda ids, pad: gen.model.prefill(ids, gen.max_length, pad,
                                                           absorb=gen.absorb),
                        autograph=False)
    chosen, rng = 0, np.random.default_rng(0)
    for width in widths:
        # Varied tokens: a prompt of one repeated token sends every token to the same
        # experts, which makes a MoE's uncompiled (by expert load) prefill look slower.
        ids = tf.constant(rng.integers(0, gen.model.config.vocab_size, (1, width)), tf.int32)
        pad = tf.zeros([1], tf.int32)
        fns = {"xla": lambda: gen._prefill(ids, pad)[0].numpy(),
               "no_xla": lambda: plain(ids, pad)[0].numpy()}
        use, why = choose_xla(median_times(fns, rounds=5), f"prefill of {width} tokens")
        log(f"prefill: {why}")
        if not use:
            break
        chosen = width
    if widths and chosen == widths[-1]:
        chosen = gen.max_length
    log(f"prefill: auto -> XLA for prompts of up to {min(chosen, gen.max_length - 1)} tokens"
        if chosen else "prefill: auto -> no XLA" + (
            "" if widths else f": a cache of {gen.max_length} tokens holds no probe of "
                              f"{PREFILL_PROBES[0]}"))
    return chosen


def run_batches(model, tok, prompts: list, max_length: int, stop_ids=(), stop_strings=(),
                batch_size: int = 8, streamer=None, absorb=True, jit_compile="false",
                generator: Generator | None = None, log=print, **sampling) -> list[dict]:
    """Generates for every prompt (int32 id arrays), `batch_size` at a time.

    Returns one dict per prompt: `completion` (text, cut at a stop string),
    `num_tokens` (generated, stop included) and `stop_reason` ("stop" or "length").
    `stop_ids` holds token ids or id sequences (a `ChatProfile`'s `stops`). `sampling`
    holds scalar `max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`.
    `jit_compile` is "auto" (`pick_generator`, which `log`s its choice), "true" or
    "false" (or a bool); `generator` replaces the one built from `max_length`,
    `stop_ids`, `absorb` and `jit_compile`.
    """
    from deepseek_tf.autojit import jit_value
    from deepseek_tf.generate.decode import normalize_stops

    jit = jit_value(jit_compile)
    if generator is not None:
        gen = generator
    elif jit == "auto":
        gen = pick_generator(model, max_length, stop_ids, tok.pad_id, absorb, log=log)
    else:
        gen = Generator(model, max_length, stop_ids, pad_id=tok.pad_id, absorb=absorb,
                        jit_compile=jit == "true")
    stops = normalize_stops(stop_ids)
    results = []
    for lo in range(0, len(prompts), batch_size):
        ids, lengths = pad_right(prompts[lo:lo + batch_size])
        try:
            out, counts = gen.generate(ids, lengths, streamer=streamer, **sampling)
        except tf.errors.InvalidArgumentError as e:
            raise UserError(f"generation refused: {assertion_text(e)}.") from e
        results += [completion(row, n, tok, stops, stop_strings)
                    for row, n in zip(out.numpy(), counts.numpy())]
    return results


def completion(row, n: int, tok, stops, stop_strings=()) -> dict:
    """`completion` (text cut at a stop string), `num_tokens` and `stop_reason` ("stop"
    or "length") of one generated row (its first `n` ids are the reply; `stops`: id
    sequences as `normalize_stops` gives them)."""
    row = [int(i) for i in row[:n]]
    text, cut = cut_at_stop(tok.decode(strip_special(row, tok)), stop_strings)
    stopped = cut or any(tuple(row[-len(st):]) == st for st in stops)
    return {"completion": text, "num_tokens": int(n),
            "stop_reason": "stop" if stopped else "length"}
