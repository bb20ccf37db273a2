"""The decode engine behind the HTTP server: a bounded queue of rows, batched per step window.

Each choice of each request is one `Row` (a prompt's ids and its sampling options). A
decode thread waits for the first pending row, waits `window` seconds more for rows
arriving together, takes as many as fit (at most `max_batch`, and prompt + new tokens
within the cache), and runs them as one batch through the generator (`Generator.generate`,
the same compiled decode loop as `python -m deepseek_tf.generate`). Rows arriving while a
batch decodes wait for the next batch. After every step the generator's streamer hands
each row its new token; the row posts the text that is settled (`stream_text`) to its
asyncio queue, and ends when it stops. A cancelled row (client gone, timeout) or one that
met a request's own stop string is ended in the graph (the streamer's return value), so
a batch whose clients all left stops decoding.

With XLA decode steps, a batch is padded to a power of two rows (one-token dummy rows)
so XLA compiles a few batch shapes, not one per size.

Example:
    >>> engine = Engine(generator, tok, stops=profile.stops)
    >>> engine.start()
    >>> row = Row(ids, max_new_tokens=16, loop=asyncio.get_running_loop())
    >>> engine.submit([row])
    >>> event = await row.events.get()     # (0, "text", "...") ... (0, "done", "stop")
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np

from deepseek_tf.generate.decode import normalize_stops
from deepseek_tf.generate.run import assertion_text, pad_right
from deepseek_tf.generate.text import cut_at_stop, stream_text, strip_special


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` rows already (HTTP 429)."""


class Row:
    """One completion being generated: a prompt, its sampling options and its output.

    Args:
      ids: int prompt ids (BOS and any chat template included).
      max_new_tokens, temperature, top_k, top_p, seed: as `Generator.generate` (seed -1:
        a fresh one).
      stop_strings: strings that end the text (the chat profile's and the request's).
      loop: the asyncio loop that reads `events`.
      events: the asyncio queue to post to (the rows of one request share one), else a new one.
      index: the row's choice index in its request.

    `events` receives (index, "text", delta) pieces, then (index, "done", finish_reason)
    or (index, "error", message). Set `cancelled` to end the row early.
    """

    def __init__(self, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = -1, stop_strings=(), loop=None, events=None,
                 index: int = 0):
        self.ids = np.asarray(ids, np.int32)
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self.top_k, self.top_p, self.seed = int(top_k), float(top_p), int(seed)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue() if events is None else events
        self.index = index
        self.tokens: list[int] = []
        self.shown, self.finish_reason = "", None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token = self.ended = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def post(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *event))

    def add(self, token: int, tok) -> bool:
        """Takes one generated token; posts the newly settled text. True if a stop string
        ended the text."""
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.tokens.append(int(token))
        text, stopped = stream_text(self.tokens, tok, self.stop_strings)
        if len(text) > len(self.shown):
            self.post("text", text[len(self.shown):])
            self.shown = text
        return stopped

    def finish(self, reason: str, tok):
        """Posts the rest of the text (what was held back) and ("done", reason)."""
        if self.finished:
            return
        text, _ = cut_at_stop(tok.decode(strip_special(self.tokens, tok)), self.stop_strings)
        if len(text) > len(self.shown):
            self.post("text", text[len(self.shown):])
            self.shown = text
        self.finish_reason, self.ended = reason, time.perf_counter()
        self.post("done", reason)


class Engine:
    """Batches rows through one `Generator` on a decode thread.

    Args:
      generator: a `deepseek_tf.generate.Generator` (its cache length bounds every row).
      tok: the run's tokenizer.
      stops: the chat profile's stops as token-id sequences (to tell "stop" from "length").
      max_batch: most rows decoded together.
      max_queue: most rows waiting; `submit` raises `QueueFull` beyond.
      window: seconds to wait after the first pending row for others to join its batch.
      metrics: an optional `metrics.Metrics`.
    """

    def __init__(self, generator, tok, stops=(), max_batch: int = 16, max_queue: int = 64,
                 window: float = 0.01, metrics=None):
        self.gen, self.tok, self.stops = generator, tok, normalize_stops(stops)
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        self.metrics = metrics
        self._pending: collections.deque[Row] = collections.deque()
        self._cv = threading.Condition()
        self._batch: list[Row | None] = []
        self._stream = self._on_step  # one object: the Generator traces once per streamer
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)

    @property
    def max_length(self) -> int:
        return self.gen.max_length

    def queue_depth(self) -> int:
        return len(self._pending)

    def active_rows(self) -> int:
        return sum(r is not None and not r.finished for r in self._batch)

    def start(self):
        self._thread.start()

    def stop(self):
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def submit(self, rows: list[Row]):
        """Queues a request's rows (all or none); `QueueFull` if they do not fit."""
        with self._cv:
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting "
                                f"completions); retry later")
            self._pending.extend(rows)
            self._cv.notify_all()

    def warm_up(self):
        """Builds the decode graph (and, with XLA, each batch shape) before serving."""
        sizes = self._buckets() if self.gen.jit_compile else [1]
        for b in sizes:
            self.gen.generate(np.ones((b, 1), np.int32), np.ones(b, np.int32),
                              max_new_tokens=min(2, self.max_length - 1), seed=0,
                              streamer=self._stream)

    def _buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return sizes + [self.max_batch]

    def _take(self) -> list[Row]:
        """The next batch: waits for a row, then `window` for others; drops cancelled rows;
        takes rows in order while prompt + new tokens fit the cache."""
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
        time.sleep(self.window)
        with self._cv:
            batch, longest, most = [], 0, 0
            keep = collections.deque()
            while self._pending:
                row = self._pending.popleft()
                if row.cancelled:
                    continue
                t, n = max(longest, len(row.ids)), max(most, row.max_new_tokens)
                if len(batch) < self.max_batch and t + n <= self.max_length:
                    batch.append(row)
                    longest, most = t, n
                else:
                    keep.append(row)
            self._pending.extendleft(reversed(keep))
            return batch

    def _loop(self):
        while not self._stopping:
            rows = self._take()
            if rows:
                self._run(rows)

    def _run(self, rows: list[Row]):
        size = next(b for b in self._buckets() if b >= len(rows)) if self.gen.jit_compile \
            else len(rows)
        fill = [None] * (size - len(rows))  # dummy rows: one greedy token after BOS
        self._batch = rows + fill
        first = np.asarray([self.tok.bos_id], np.int32)
        ids, lengths = pad_right([r.ids for r in rows] + [first] * len(fill), self.tok.pad_id)
        opts = [(r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.seed) for r in rows]
        opts += [(1, 0.0, 0, 1.0, 0)] * len(fill)
        new, temp, top_k, top_p, seed = (np.asarray(c) for c in zip(*opts))
        start = time.perf_counter()
        if self.metrics:
            self.metrics.batch_size.observe(len(rows))
        try:
            self.gen.generate(ids, lengths, max_new_tokens=new.astype(np.int32),
                              temperature=temp.astype(np.float32), top_k=top_k.astype(np.int32),
                              top_p=top_p.astype(np.float32), seed=seed.astype(np.int32),
                              streamer=self._stream)
        except Exception as e:  # noqa: BLE001 (a failed batch fails its requests, not the server)
            import tensorflow as tf
            text = assertion_text(e) if isinstance(e, tf.errors.OpError) else str(e)
            for r in rows:
                if not r.finished:
                    r.finish_reason = "error"
                    r.post("error", f"generation failed: {text}")
        for r in rows:  # rows the loop ended without a "done" flag (cancelled)
            r.finish("cancelled" if r.cancelled else "length", self.tok)
        if self.metrics:
            self.metrics.observe_batch(rows, time.perf_counter() - start)
        self._batch = []

    def _on_step(self, step, tokens, done) -> np.ndarray:
        """The generator's streamer: hands out this step's tokens; returns rows to end."""
        ended = np.zeros(len(tokens), bool)
        for i, row in enumerate(self._batch):
            if row is None or row.finished:
                ended[i] = True
                continue
            if row.cancelled:
                row.finish("cancelled", self.tok)
                ended[i] = True
                continue
            stopped = row.add(tokens[i], self.tok)
            if stopped or done[i]:
                hit = stopped or any(tuple(row.tokens[-len(s):]) == s for s in self.stops)
                row.finish("stop" if hit else "length", self.tok)
                ended[i] = True
        return ended
