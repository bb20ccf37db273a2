"""Order-preserving parallel map over chunks, with bounded memory (`--data.num_proc`).

Workers are started with `spawn` (TensorFlow's threads do not survive `fork`)
and build their state once through `initializer`. Spawned workers import the
modules of `fn` and `initializer` and the caller's `__main__` module, so those
must not import TensorFlow at the top (deepseek_tf.data.stages does not; the
`python -m deepseek_tf.*` entry points import it lazily). At most `2 * num_proc`
chunks are in flight, so a stream larger than memory stays a stream. With
`num_proc=1` everything runs in this process. The output order (and so the
prepared data) does not depend on `num_proc`.

Example:
    >>> list(ordered_map(sum, iter([[1, 2], [3]]), num_proc=2))
    [3, 3]
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import multiprocessing
from typing import Callable, Iterable, Iterator


def chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def ordered_map(fn: Callable, chunks: Iterable, num_proc: int = 1,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """Yields fn(chunk) for each chunk, in order.

    Args:
      fn: a picklable module-level function.
      chunks: the inputs (consumed lazily).
      num_proc: worker processes; 1 = this process.
      initializer, initargs: run once per worker (and once here when num_proc=1).
    """
    if num_proc <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, chunks)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=initializer,
                                initargs=initargs) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
