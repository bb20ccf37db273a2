"""`python -m deepseek_tf.launch` as a test subprocess, with its output collected live."""

import os
import re
import signal
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}


class Launcher:
    """`python -m deepseek_tf.launch ARGS` in a session of its own (with `env` added to the
    environment), output collected as it comes; `finish` kills that session on timeout
    (the launcher's workers die with it)."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_tf.launch", *args], cwd=ROOT,
            env={**ENV, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines, self._cond = [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern, count=1, timeout=60):
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([l for l in self.lines if re.search(pattern, l)]) >= count, timeout)
        assert ok, "\n".join(self.lines)

    def finish(self, timeout=60):
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stdout.close()
        return code

    def text(self):
        with self._cond:
            return "\n".join(self.lines)

    def children(self):
        return [int(m.group(1)) for l in self.lines if (m := re.search(r"child (\d+)$", l))]


def train_flags(exp, workdir) -> list[str]:
    """The trainer's command-line flags of Experiment `exp` in `workdir` (every field, so
    nothing depends on defaults)."""
    out = [f"--workdir={workdir}"]
    for section, values in exp.to_dict().items():
        if section != "version":
            out += [f"--{section}.{k}={v}" for k, v in values.items()]
    return out


def weights_sha(output: str, worker: int) -> str:
    """The `weights sha256` that worker `worker` logged at the end of a launcher run."""
    found = re.findall(rf"^\[worker {worker}\] weights sha256: (\w+)$", output, re.M)
    assert len(found) == 1, output[-3000:]
    return found[0]
