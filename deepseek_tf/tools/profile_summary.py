"""Summarise a `--train.profile_steps` trace on the console: time per TF op type.

    python -m deepseek_tf.tools.profile_summary --workdir=runs/x [--top=20] [--steps=2]

Reads the newest trace under `<workdir>/tensorboard/plugins/profile/` with TensorFlow's
own trace converter (the data TensorBoard's Profile tab shows as "TF op stats"; the tab
itself needs `tensorboard-plugin-profile`, which this does not). Prints, per op type,
its self time per profiled step, its share of the busy time and how many ops ran per step.
Self times are summed over the threads that ran ops (2 inter-op threads on 2 cores), so
they add up to more than the wall time; `IDLE` (threads waiting) is left out of the shares.
"""

import glob
import json
import os

from deepseek_tf.quiet import quiet_stderr, quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402


def define_flags():
    """The command line's flags (defined only when run as a command)."""
    flags.DEFINE_string("workdir", "", "The run directory (trained with --train.profile_steps).")
    flags.DEFINE_integer("top", 20, "Op types to list.")
    flags.DEFINE_integer("steps", 0, "Profiled steps, to print times per step (0 = read "
                         "profile_steps from the run's config.json).")


def latest_trace(workdir: str) -> str:
    """The newest *.xplane.pb of the run."""
    found = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                   "*.xplane.pb"))
    if not found:
        raise UserError(f"no profile in {workdir}/tensorboard/plugins/profile: train with "
                        f"--train.profile_steps=A,B first.")
    return max(found, key=os.path.getmtime)


def profiled_steps(workdir: str) -> int:
    """B - A + 1 from the run's saved `profile_steps` (1 if it is not there)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            a, b = json.load(f)["train"]["profile_steps"].split(",")
        return int(b) - int(a) + 1
    except (OSError, KeyError, ValueError):
        return 1


def op_type_times(trace: str) -> dict[str, tuple[float, float]]:
    """{op type: (total self time in microseconds, occurrences)} of one trace."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    with quiet_stderr():  # the trace converter logs through C++
        data, ok = plugin.xspace_to_tools_data([trace], "framework_op_stats", {})
    if not ok:
        raise UserError(f"TensorFlow could not read the trace {trace}.")
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    out: dict[str, tuple[float, float]] = {}
    for row in table["rows"]:
        r = dict(zip(cols, (c.get("v") for c in row["c"])))
        t, n = out.get(r["type"], (0.0, 0.0))
        out[r["type"]] = (t + r["total_self_time"], n + r["occurrences"])
    return out


def summary(workdir: str, top: int = 20, steps: int = 0) -> list[str]:
    """The printed lines (see the module doc)."""
    trace = latest_trace(workdir)
    steps = steps or profiled_steps(workdir)
    times = op_type_times(trace)
    busy = {k: v for k, v in times.items() if k != "IDLE"}
    total = sum(t for t, _ in busy.values()) or 1.0
    n_ops = sum(n for _, n in busy.values())
    lines = [f"trace: {trace}",
             f"{steps} step(s); busy op time {total / steps / 1e3:.1f} ms/step over all "
             f"threads, {n_ops / steps:.0f} ops/step",
             f"{'op type':36s} {'ms/step':>9s} {'share':>7s} {'ops/step':>9s}"]
    for name, (t, n) in sorted(busy.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{name:36s} {t / steps / 1e3:9.2f} {100 * t / total:6.1f}% "
                     f"{n / steps:9.0f}")
    return lines


def main(argv):
    F = flags.FLAGS
    print("\n".join(summary(F.workdir, F.top, F.steps)))


def entry():
    """The console script `deepseek-tf-profile-summary`."""
    define_flags()
    dflags.run(main, required=("workdir",))


if __name__ == "__main__":
    entry()
