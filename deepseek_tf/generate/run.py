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
from deepseek_tf.generate.decode import Generator
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
    """Times a few decode steps with and without XLA on this machine and returns the
    faster `Generator` (its compiled step is reused by the real run).

    Small models decode several times faster with XLA (fewer, fused kernels); machines
    and model sizes differ, so this is measured, not assumed.
    """
    import time

    prompt = np.full((1, 4), 1, np.int32)
    steps = min(16, max_length - 4)
    gens, best = {}, {}
    for jit in (False, True):
        gens[jit] = Generator(model, max_length, stop_ids, pad_id, absorb=absorb,
                              jit_compile=jit)
        times = []
        for n in (1, steps, 1, steps):  # the first pair builds the graphs
            t0 = time.perf_counter()
            gens[jit].generate(prompt, [4], max_new_tokens=n)[0].numpy()
            times.append(time.perf_counter() - t0)
        best[jit] = max(times[3] - times[2], 1e-9) / max(steps - 1, 1)
    choice = best[True] < best[False]
    log(f"decode steps: {best[False] * 1e3:.2f} ms without XLA, {best[True] * 1e3:.2f} ms "
        f"with XLA: using {'XLA' if choice else 'no XLA'} (--jit_compile=auto)")
    return gens[choice]


def run_batches(model, tok, prompts: list, max_length: int, stop_ids=(), stop_strings=(),
                batch_size: int = 8, streamer=None, absorb=True, jit_compile=False,
                generator: Generator | None = None, **sampling) -> list[dict]:
    """Generates for every prompt (int32 id arrays), `batch_size` at a time.

    Returns one dict per prompt: `completion` (text, cut at a stop string),
    `num_tokens` (generated, stop token included) and `stop_reason` ("stop" or
    "length"). `sampling` holds scalar `max_new_tokens`, `temperature`, `top_k`,
    `top_p`, `seed`. `generator` (e.g. from `pick_generator`) replaces the one built from
    `max_length`, `stop_ids`, `absorb` and `jit_compile`.
    """
    gen = generator or Generator(model, max_length, stop_ids, pad_id=tok.pad_id,
                                 absorb=absorb, jit_compile=jit_compile)
    results = []
    for lo in range(0, len(prompts), batch_size):
        ids, lengths = pad_right(prompts[lo:lo + batch_size])
        try:
            out, counts = gen.generate(ids, lengths, streamer=streamer, **sampling)
        except tf.errors.InvalidArgumentError as e:
            raise UserError(f"generation refused: {assertion_text(e)}.") from e
        for row, n in zip(out.numpy(), counts.numpy()):
            row = row[:n].tolist()
            text, cut = cut_at_stop(tok.decode(strip_special(row, tok)), stop_strings)
            stopped = cut or (n > 0 and row[-1] in stop_ids)
            results.append({"completion": text, "num_tokens": int(n),
                            "stop_reason": "stop" if stopped else "length"})
    return results
