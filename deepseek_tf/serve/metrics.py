"""Prometheus metrics of the HTTP server (`GET /metrics`, the Prometheus text format).

    deepseek_tf_requests_total{endpoint,status}     requests answered
    deepseek_tf_prompt_tokens_total                 prompt tokens of accepted requests
    deepseek_tf_generated_tokens_total              tokens generated (stops included)
    deepseek_tf_queue_depth                         completions waiting for a batch
    deepseek_tf_active_rows                         completions being decoded
    deepseek_tf_time_to_first_token_seconds         queueing + prefill + first step
    deepseek_tf_tokens_per_second                   decode rate of each batch (all rows)
    deepseek_tf_batch_size                          completions per decoded batch

Example:
    >>> m = Metrics(engine)
    >>> m.requests.labels("/v1/completions", "200").inc()
    >>> text = m.render()
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

_TIMES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RATES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
_SIZES = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's metrics in their own registry (several servers may share a process).

    Args:
      engine: optional; its queue depth and active rows are read at scrape time
        (`attach` sets it later).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deepseek_tf_requests", "Requests answered.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("deepseek_tf_prompt_tokens", "Prompt tokens of accepted "
                                     "requests.", registry=r)
        self.generated_tokens = Counter("deepseek_tf_generated_tokens", "Tokens generated "
                                        "(stop tokens included).", registry=r)
        self.queue_depth = Gauge("deepseek_tf_queue_depth", "Completions waiting for a batch.",
                                 registry=r)
        self.active_rows = Gauge("deepseek_tf_active_rows", "Completions being decoded.",
                                 registry=r)
        self.ttft = Histogram("deepseek_tf_time_to_first_token_seconds", "Seconds from a "
                              "request's arrival to its first token.", buckets=_TIMES,
                              registry=r)
        self.tokens_per_second = Histogram("deepseek_tf_tokens_per_second", "Tokens per "
                                           "second of each decoded batch (all its rows).",
                                           buckets=_RATES, registry=r)
        self.batch_size = Histogram("deepseek_tf_batch_size", "Completions per decoded batch.",
                                    buckets=_SIZES, registry=r)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine):
        self.queue_depth.set_function(engine.queue_depth)
        self.active_rows.set_function(engine.active_rows)

    def observe_batch(self, rows, seconds: float):
        """Counts a decoded batch: its tokens, each row's time to first token, its rate."""
        tokens = sum(len(r.tokens) for r in rows)
        self.generated_tokens.inc(tokens)
        for r in rows:
            if r.first_token is not None:
                self.ttft.observe(r.first_token - r.submitted)
        if seconds > 0 and tokens:
            self.tokens_per_second.observe(tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
