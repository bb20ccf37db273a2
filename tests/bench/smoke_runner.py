"""Runs benches' `main(["--smoke"])` one after the other in this one process (TensorFlow
is imported once); their own side processes start as in a real run.

    python tests/bench/smoke_runner.py NAME...   # -> one `SMOKE <json>` line per bench

Each line: {"name", "ok", "stdout", "error", "seconds", "cpu_seconds"} (cpu: this process's
and its finished side processes'); stderr is the process's own (TF's log lines
would land there).
"""

import contextlib
import importlib
import io
import json
import os
import resource
import sys
import time
import traceback

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "bench")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(names):
    sys.path.insert(0, BENCH)
    real_stdout = sys.stdout
    for name in names:
        out, ok, error, t0, cpu0 = io.StringIO(), True, "", time.perf_counter(), cpu_seconds()
        try:
            with contextlib.redirect_stdout(out):
                importlib.import_module(name).main(["--smoke"])
        except SystemExit as e:  # a bench that exits says why
            ok, error = e.code in (0, None), str(e.code)
        except Exception:  # noqa: BLE001 (reported to the test)
            ok, error = False, traceback.format_exc()
        print("SMOKE " + json.dumps({"name": name, "ok": ok, "stdout": out.getvalue(),
                                     "error": error, "seconds": time.perf_counter() - t0,
                                     "cpu_seconds": cpu_seconds() - cpu0}),
              file=real_stdout, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
