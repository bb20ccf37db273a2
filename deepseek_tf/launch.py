"""`python -m deepseek_tf.launch --num_workers=N -- <train flags>`: N workers on this machine.

Starts N `python -m deepseek_tf.train` processes on 127.0.0.1, each with the
`TF_CONFIG` of its place in the cluster (free ports; worker 0 is the chief),
and prints their output prefixed with `[worker i]`. The workers share one
process group of their own:

- a worker that fails or dies (any exit code other than 0 or 42, or a signal such
  as SIGKILL) makes the launcher kill the whole group at once, with one line that
  names the worker and says to run the same command again to resume from the last
  checkpoint: a MultiWorkerMirroredStrategy worker whose peer is gone would
  otherwise wait for it (up to `--train.collective_timeout`);
- Ctrl-C, `--timeout`, or the launcher's own death (Linux) kill the group too;
- SIGTERM to the launcher is forwarded to every worker (a preemption): they save
  a checkpoint at the same step and exit with code 42, and so does the launcher.
  SIGTERM to a single worker has the same effect.

Running the same command again resumes from the last checkpoint. To train on
several machines, run `python -m deepseek_tf.train` once per machine with its
own `TF_CONFIG` (README: "Multi-machine training").

Example:
    python -m deepseek_tf.launch --num_workers=2 -- --flagfile=configs/tiny.flags \\
        --workdir=runs/tiny-2w

The launcher imports no TensorFlow; `Cluster` is its library form (tests use it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from deepseek_tf import exit_codes

HOST = "127.0.0.1"


def free_ports(n: int, host: str = HOST) -> list[int]:
    """`n` distinct ports that are free on `host` right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: Sequence[int], index: int, host: str = HOST) -> str:
    """The TF_CONFIG of worker `index` in a cluster of workers on `host:ports`."""
    return json.dumps({"cluster": {"worker": [f"{host}:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def visible_gpus(environ=os.environ) -> list[str]:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`'s."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",")
                if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def assign_gpus(gpus: Sequence[str], num_workers: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: an equal contiguous share of `gpus` each
    (leftovers unused); with fewer GPUs than workers, worker i shares gpus[i % len];
    None (leave the environment alone) without GPUs."""
    if not gpus:
        return [None] * num_workers
    if len(gpus) < num_workers:
        return [gpus[i % len(gpus)] for i in range(num_workers)]
    per = len(gpus) // num_workers
    return [",".join(gpus[i * per:(i + 1) * per]) for i in range(num_workers)]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the launcher dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def failure(index: int, code: int) -> str:
    """The launcher's line about worker `index` that ended with `code` (not 0 or 42)."""
    if code == exit_codes.USAGE:  # its own `error:` line says what to fix
        return f"worker {index} failed with exit code {code}; stopping all workers"
    how = (f"died (killed by {signal.Signals(-code).name})" if code < 0
           else f"failed with exit code {code}")
    return (f"worker {index} {how}; stopping all workers; run the same command again to "
            f"resume from the last checkpoint")


class Cluster:
    """N training processes on this machine, in one process group.

    Args:
      train_args: flags for every worker (the part after `--`).
      num_workers: processes to start.
      module: the module each worker runs with `python -m`.
      cpus_per_worker: if > 0, pin worker i to CPUs [i*k, (i+1)*k) (modulo the
        machine's CPUs) and size TF's thread pools to k.
      env: environment of the workers (default: this process's).
      printer: receives every output line, prefixed with `[worker i] `.

    Example:
        >>> cluster = Cluster(["--workdir=/tmp/w"], num_workers=2)
        >>> cluster.start()
        >>> cluster.wait(timeout=600)
        0
    """

    def __init__(self, train_args: Sequence[str], num_workers: int, *,
                 module: str = "deepseek_tf.train", cpus_per_worker: int = 0,
                 env: dict | None = None, printer: Callable[[str], None] = print,
                 python: str = sys.executable, cwd: str | None = None,
                 gpus: Sequence[str] = ()):
        self.train_args, self.num_workers, self.module = list(train_args), num_workers, module
        self.gpu_shares = assign_gpus(list(gpus), num_workers)
        self.cpus_per_worker, self.printer, self.python, self.cwd = (
            cpus_per_worker, printer, python, cwd)
        self.env = dict(os.environ if env is None else env)
        self.procs: list[subprocess.Popen] = []
        self.output: list[list[str]] = [[] for _ in range(num_workers)]
        self.pgid: int | None = None
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._line_added = threading.Condition(self._lock)

    def _preexec(self, index: int) -> Callable[[], None]:
        cpus = None
        if self.cpus_per_worker > 0:
            available = sorted(os.sched_getaffinity(0))
            cpus = {available[(index * self.cpus_per_worker + j) % len(available)]
                    for j in range(self.cpus_per_worker)}
        group = self.pgid or 0  # worker 0 starts a new process group; the others join it

        def preexec():
            os.setpgid(0, group)
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        return preexec

    def start(self) -> None:
        ports = free_ports(self.num_workers)
        for i in range(self.num_workers):
            env = {**self.env, "TF_CONFIG": tf_config(ports, i), "PYTHONUNBUFFERED": "1"}
            if self.cpus_per_worker > 0:
                env["TF_NUM_INTRAOP_THREADS"] = str(self.cpus_per_worker)
                env["TF_NUM_INTEROP_THREADS"] = str(self.cpus_per_worker)
            if self.gpu_shares[i] is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.gpu_shares[i]
            proc = subprocess.Popen(
                [self.python, "-m", self.module, *self.train_args], env=env, cwd=self.cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", bufsize=1, preexec_fn=self._preexec(i))
            if self.pgid is None:
                self.pgid = proc.pid
            self.procs.append(proc)
            gpu = "" if self.gpu_shares[i] is None else f", GPU(s) {self.gpu_shares[i]}"
            self.printer(f"[launch] worker {i}: pid {proc.pid}, {HOST}:{ports[i]}{gpu}")
            reader = threading.Thread(target=self._read, args=(i, proc), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            with self._lock:  # one worker's line at a time: never two on one output line
                self.output[index].append(line)
                self._line_added.notify_all()
                self.printer(f"[worker {index}] {line}")

    def wait_for_line(self, index: int, needle: str, timeout: float) -> bool:
        """Waits until worker `index` printed a line containing `needle` (False on timeout
        or if the worker exited first)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if any(needle in line for line in self.output[index]):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.procs[index].poll() is not None:
                    return False
                self._line_added.wait(min(left, 0.5))

    def signal_all(self, sig: int) -> None:
        """Sends `sig` to every worker still running."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL to the whole process group (the workers and anything they started)."""
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            proc.wait()

    def wait(self, timeout: float | None = None, grace: float = 120.0) -> int:
        """Waits for every worker; returns the launcher's exit code (see `exit_codes`).

        A worker failure kills the rest at once; a preempted worker (exit code 42)
        gives the others `grace` seconds to save and exit too. On return nothing of
        the process group is left.
        """
        deadline = time.monotonic() + timeout if timeout else None
        grace_deadline, result = None, exit_codes.OK
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if all(c is not None for c in codes):
                    break
                now = time.monotonic()
                # A worker killed by a signal first: its peers then fail because it is gone.
                failed = sorted(((i, c) for i, c in enumerate(codes) if c not in (None, 0)),
                                key=lambda f: f[1] >= 0)
                if failed and result == exit_codes.OK:
                    i, result = failed[0]
                    if result == exit_codes.PREEMPTED:
                        self.printer(f"[launch] worker {i} was preempted; waiting up to "
                                     f"{grace:.0f}s for the others to save and exit")
                        grace_deadline = now + grace
                    else:
                        self.printer(f"[launch] error: {failure(i, result)}")
                        self.kill()
                        break
                if grace_deadline is not None and now > grace_deadline:
                    self.printer("[launch] grace period over; killing the remaining workers")
                    self.kill()
                    break
                if deadline is not None and now > deadline:
                    self.printer(f"[launch] error: timed out after {timeout:.0f}s; "
                                 f"killing all workers")
                    self.kill()
                    return exit_codes.TIMEOUT
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.printer("[launch] interrupted; killing all workers")
            self.kill()
            return exit_codes.INTERRUPTED
        finally:
            self.kill()  # whatever the workers left behind in their group
            for reader in self._readers:
                reader.join(timeout=5)
        if result == exit_codes.OK:
            result = next((c for c in (p.returncode for p in self.procs) if c), exit_codes.OK)
        return 128 - result if result < 0 else result  # killed by signal N: 128 + N

    def preempt_on_sigterm(self) -> None:
        """Installs a SIGTERM handler that forwards the signal to every worker (they save
        a checkpoint and exit with code 42; `wait` then applies its grace period), and
        Python's own SIGINT handler (KeyboardInterrupt) even where SIGINT was ignored."""

        def handler(signum, frame):
            del signum, frame
            self.printer("[launch] SIGTERM: asking every worker to save a checkpoint and exit")
            self.signal_all(signal.SIGTERM)

        signal.signal(signal.SIGTERM, handler)
        # Ctrl-C stops every worker (`wait`). Set explicitly: a process started in the
        # background of a non-interactive shell, or by a parent that ignores SIGINT,
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_tf.launch",
        description="Run N training workers on this machine (MultiWorkerMirroredStrategy "
                    "over 127.0.0.1). Everything after `--` is passed to every worker's "
                    "`python -m deepseek_tf.train` (see its --help).",
        epilog=exit_codes.HELP)
    parser.add_argument("--num_workers", type=int, required=True,
                        help="worker processes to start (>= 1); worker 0 is the chief")
    parser.add_argument("--timeout", type=float, default=0,
                        help="kill all workers and exit 124 after this many seconds "
                             "(0 = no limit)")
    parser.add_argument("--grace", type=float, default=120,
                        help="after a preemption, seconds the other workers get to save "
                             "and exit before they are killed")
    parser.add_argument("--cpus_per_worker", type=int, default=0,
                        help="pin each worker to this many CPUs of its own and size its "
                             "thread pools to match (0 = no pinning)")
    parser.add_argument("--assign_gpus", action=argparse.BooleanOptionalAction, default=True,
                        help="give each worker its own share of the visible GPUs "
                             "(CUDA_VISIBLE_DEVICES; from nvidia-smi -L or the launcher's "
                             "CUDA_VISIBLE_DEVICES); no effect without GPUs")
    parser.add_argument("--module", default="deepseek_tf.train",
                        help="module every worker runs with python -m")
    parser.add_argument("train_args", nargs="*", help="-- then the training flags")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"--num_workers must be >= 1, got {args.num_workers}")
    if args.timeout < 0 or args.grace < 0 or args.cpus_per_worker < 0:
        parser.error("--timeout, --grace and --cpus_per_worker must be >= 0")
    return args


def _print_line(line: str) -> None:
    """One write per line (print() writes the text and the newline separately, so two
    threads could put two workers' lines on one output line)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cluster = Cluster(args.train_args, args.num_workers, module=args.module,
                      cpus_per_worker=args.cpus_per_worker,
                      printer=_print_line,
                      gpus=visible_gpus() if args.assign_gpus else ())
    print(f"[launch] starting {args.num_workers} workers on {HOST}: python -m {args.module} "
          f"{' '.join(args.train_args)}", flush=True)
    cluster.preempt_on_sigterm()
    try:
        cluster.start()
        code = cluster.wait(timeout=args.timeout or None, grace=args.grace)
    finally:
        cluster.kill()  # nothing may outlive the launcher
    print(f"[launch] exit code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
