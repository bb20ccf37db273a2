"""Metrics out: one JSON line per log step, TensorBoard scalars, a progress line, loss.svg.

Example:
    >>> log = MetricLogger("/tmp/run", total_steps=100)
    >>> log.write(10, {"loss": 2.5, "lr": 1e-3}, kind="train")
    >>> log.close()
"""

from __future__ import annotations

import json
import math
import os
import time

import tensorflow as tf

from deepseek_tf.atomic import atomic_write
from deepseek_tf.workdir_files import LOG_FILE, PLOT_FILE, TENSORBOARD_DIR


def truncate_log(workdir: str, last_step: int) -> None:
    """Drops log lines past `last_step` (written after the checkpoint we resume from)."""
    path = os.path.join(workdir, LOG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write(path, "".join(kept))


def read_log(workdir: str) -> list[dict]:
    path = os.path.join(workdir, LOG_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class MetricLogger:
    """Writes metrics to log.jsonl, TensorBoard (train/ and eval/) and stdout.

    Args:
      workdir: run directory.
      total_steps: for the progress line's ETA.
      enabled: False on non-chief workers (nothing is written).
    """

    def __init__(self, workdir: str, total_steps: int, enabled: bool = True, printer=print):
        self.workdir, self.total_steps, self.enabled, self.printer = (
            workdir, total_steps, enabled, printer)
        self._writers = {}
        self._t0 = time.time()
        self._start_step = None

    def _writer(self, kind: str):
        if kind not in self._writers:
            self._writers[kind] = tf.summary.create_file_writer(
                os.path.join(self.workdir, TENSORBOARD_DIR, kind))
        return self._writers[kind]

    def write(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        metrics = {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
                   for k, v in metrics.items()}
        with open(os.path.join(self.workdir, LOG_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, "time": time.time(),
                                **metrics}) + "\n")
        with self._writer(kind).as_default(step=int(step)):
            for k, v in metrics.items():
                if isinstance(v, list):  # e.g. per-expert load fractions
                    tf.summary.histogram(k, v)
                else:
                    tf.summary.scalar(k, v)
        self.printer(self._line(step, metrics, kind))

    def write_event(self, step: int, kind: str, record: dict, line: str) -> None:
        """Logs an event (e.g. a recovery): `record` (any JSON values) into log.jsonl,
        its numeric values as TensorBoard scalars under `kind`, and `line` on stdout."""
        if not self.enabled:
            return
        with open(os.path.join(self.workdir, LOG_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, "time": time.time(),
                                **record}) + "\n")
        with self._writer(kind).as_default(step=int(step)):
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tf.summary.scalar(k, float(v))
        self.printer(line)

    def _line(self, step: int, m: dict, kind: str) -> str:
        if kind == "eval":
            parts = [f"step {step:>6}/{self.total_steps}", f"eval loss {m['loss']:.4f}"]
            if "perplexity" in m:
                parts.append(f"ppl {m['perplexity']:.3f} | acc {m['accuracy']:.3f}")
            return " | ".join(parts + _reward_parts(m))
        if self._start_step is None:
            self._start_step, self._t0 = step, time.time()
            eta = ""
        else:
            rate = (step - self._start_step) / max(time.time() - self._t0, 1e-9)
            eta = f" | eta {_fmt_duration((self.total_steps - step) / max(rate, 1e-9))}"
        parts = [f"step {step:>6}/{self.total_steps}", f"loss {m['loss']:.4f}",
                 f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
                 f"{m['tokens_per_sec']:,.0f} tok/s", f"{m['tokens_seen'] / 1e6:.2f}M tokens"]
        if "mtp_loss" in m:
            parts.append(f"mtp {m['mtp_loss']:.4f}")
        if "indexer_loss" in m:
            parts.append(f"indexer kl {m['indexer_loss']:.4f}")
        if "moe/load_max" in m:
            parts.append(f"moe max/mean load {m['moe/load_max']:.2f}, "
                         f"dropped {100 * m['moe/dropped_frac']:.1f}%")
        parts += _reward_parts(m)
        if m.get("skipped_steps"):  # mixed_float16 overflows so far, and the loss scale now
            parts.append(f"{m['skipped_steps']:.0f} skipped "
                         f"(loss scale {m.get('loss_scale', 1):,.0f})")
        return " | ".join(parts) + eta

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


def plot_losses(workdir: str) -> str | None:
    """Writes loss.svg (train and eval loss against step) from log.jsonl."""
    from deepseek_tf.plot import Series, line_chart

    rows = read_log(workdir)
    train = [(r["step"], r.get("loss_avg", r.get("loss"))) for r in rows
             if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "eval" and "loss" in r]
    series = [Series("train (mean since last log)", train),
              Series("eval", evals, dots=True)]
    series = [s for s in series if any(math.isfinite(v) for _, v in s.points)]
    if not series:
        return None
    path = os.path.join(workdir, PLOT_FILE)
    atomic_write(path, line_chart(series, "step", "loss (nats/token)"))
    return path


def _reward_parts(m: dict) -> list[str]:
    """DPO's console entries (train/dpo.py), if `m` has them."""
    if "rewards/margin" not in m:
        return []
    return [f"reward acc {m['rewards/accuracy']:.3f}",
            f"margin {m['rewards/margin']:.3f} (chosen {m['rewards/chosen']:.3f}, rejected "
            f"{m['rewards/rejected']:.3f})"]
