"""`--train.profile_steps=A,B`: the TF profiler over train steps A..B (1-based, inclusive),
written into the run's TensorBoard directory (`<workdir>/tensorboard/plugins/profile/`;
open TensorBoard's Profile tab, which needs `pip install tensorboard-plugin-profile`).

Example:
    >>> prof = StepProfiler("3,5", "/tmp/run/tensorboard")
    >>> prof.before(3)   # starts the trace
    >>> prof.after(5)    # stops it after step 5's outputs reached the host
"""

from __future__ import annotations

import tensorflow as tf


def parse_steps(value: str) -> tuple[int, int] | None:
    """"A,B" -> (A, B); "" -> None. Raises ValueError on anything else."""
    if not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected two step numbers A,B (e.g. 5,8), got {value!r}")
    a, b = int(parts[0]), int(parts[1])
    if not 1 <= a <= b:
        raise ValueError(f"expected 1 <= A <= B, got {value!r}")
    return a, b


class StepProfiler:
    """Starts the TF profiler before step A and stops it after step B (chief only)."""

    def __init__(self, steps: str, logdir: str, enabled: bool = True, log=print):
        self.range = parse_steps(steps) if enabled else None
        self.logdir, self.log, self.active = logdir, log, False

    def before(self, step: int) -> None:
        if self.range and step == self.range[0] and not self.active:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.range[1]:
            self.stop()
            self.log(f"profiled steps {self.range[0]}-{self.range[1]} into {self.logdir} "
                     f"(TensorBoard's Profile tab)")

    def stop(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
