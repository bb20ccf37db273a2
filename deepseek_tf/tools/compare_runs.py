"""Plot the loss curves (or any logged metric) of several runs in one SVG chart.

    python -m deepseek_tf.tools.compare_runs --workdirs=runs/tiny,runs/tiny-long --output=compare.svg
    python -m deepseek_tf.tools.compare_runs --workdirs=runs/a,runs/b --metric=rewards/accuracy

Reads each workdir's log.jsonl; draws the train series (solid) and the eval series
(dots) of --metric against the step, labelled by the workdir's name, and prints the
last value of each.
"""

import json
import math
import os


from absl import flags

from deepseek_tf import flags as dflags
from deepseek_tf.errors import UserError


def define_flags():
    """The command line's flags (defined only when run as a command)."""
    flags.DEFINE_string("workdirs", "", "Comma-separated run directories (each with log.jsonl).")
    flags.DEFINE_string("output", "compare.svg", "The SVG file to write (open it in a "
                        "browser).")
    flags.DEFINE_string("metric", "loss", "The logged metric to plot (loss, accuracy, "
                        "rewards/margin, ...).")
    flags.DEFINE_enum("kinds", "both", ["both", "train", "eval"], "Which series to draw.")


def read_series(workdir: str, metric: str, kind: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` in `workdir`'s log.jsonl rows of `kind`."""
    path = os.path.join(workdir, "log.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no log.jsonl: not a training run.")
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == kind and isinstance(r.get(metric), (int, float)) and \
                    math.isfinite(r[metric]):
                out.append((r["step"], float(r[metric])))
    return out


def compare(workdirs: list[str], output: str, metric: str = "loss", kinds: str = "both",
            log=print) -> str:
    """Writes the chart (SVG); returns its path."""
    from deepseek_tf.atomic import atomic_write
    from deepseek_tf.plot import COLORS, Series, line_chart

    if not output.endswith(".svg"):
        raise UserError(f"--output={output}: the chart is an SVG file; name it *.svg.")
    series = []
    for i, wd in enumerate(workdirs):
        name = os.path.basename(os.path.normpath(wd))
        for kind in ("train", "eval"):
            if kinds not in ("both", kind):
                continue
            points = read_series(wd, metric, kind)
            if points:
                series.append(Series(f"{name} {kind}", points, lines=kind == "train",
                                     dots=kind == "eval", color=COLORS[i % len(COLORS)]))
                log(f"{name:<24} {kind:<5} {metric} at step {points[-1][0]}: "
                    f"{points[-1][1]:.4f}")
    if not series:
        raise UserError(f"no {metric!r} values in the logs of {', '.join(workdirs)}.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_write(output, line_chart(series, "step", metric))
    log(f"wrote {output}")
    return output


def main(argv):
    F = flags.FLAGS
    dirs = [d for d in F.workdirs.split(",") if d.strip()]
    if not dirs:
        raise UserError("--workdirs is required (see --help).")
    compare(dirs, F.output, F.metric, F.kinds)


def entry():
    """The console script `deepseek-tf-compare-runs`."""
    define_flags()
    dflags.run(main)


if __name__ == "__main__":
    entry()
