"""`--jit_compile=auto|true|false`: one type and one timer for train, generate, evaluate
and export.

Whether XLA makes a step faster depends on the machine and the model, so `auto` measures
it: `median_times` runs each candidate (already built) a few times to trace and compile,
then times them in alternating rounds; `choose_xla` keeps the faster. The train step
(`train/autotune.py`) and the decode loop (`generate/run.py`) both decide this way.
`cpu_flags` reads the machine's CPU feature flags (for `precision=auto` and the XLA
cache's directory). A leaf module: it imports nothing from the package.

Example:
    >>> jit_value(True), jit_value("AUTO")
    ('true', 'auto')
    >>> choose_xla({"xla": 0.01, "no_xla": 0.03}, "decode")[0]
    True
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

JIT_CHOICES = ("auto", "true", "false")
JIT_HELP = ("XLA-compile the step: true, false, or auto = time it both ways on this machine "
            "first and keep the faster")


def jit_value(value) -> str:
    """"auto", "true" or "false" from a flag string or a bool (ValueError otherwise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text not in JIT_CHOICES:
        raise ValueError(f"jit_compile={value!r}: choose one of {', '.join(JIT_CHOICES)}.")
    return text


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def median_times(fns: dict[str, Callable[[], object]], rounds: int = 3,
                 warmup: int = 2) -> dict[str, float]:
    """{name: median seconds of one call}: each fn is called `warmup` times (trace,
    compile, warm caches), then all are timed in `rounds` alternating rounds, so a
    machine that slows down mid-way slows every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def choose_xla(times: dict[str, float], what: str, margin: float = 1.0,
               per: int = 1) -> tuple[bool, str]:
    """(use XLA, reason) from `median_times` of {"xla", "no_xla"}: XLA if at least `margin`
    times faster. `per` divides the times for the message (e.g. ms per token)."""
    speedup = times["no_xla"] / max(times["xla"], 1e-12)
    use = speedup >= margin
    return use, (f"{what} {times['xla'] / per * 1e3:.2f} ms with XLA vs "
                 f"{times['no_xla'] / per * 1e3:.2f} ms without ({speedup:.2f}x)")
