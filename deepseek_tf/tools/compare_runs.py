"""Plot the loss curves (or any logged metric) of several runs in one PNG.

    python -m deepseek_tf.tools.compare_runs --workdirs=runs/tiny,runs/tiny-long --output=compare.png
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
    flags.DEFINE_string("output", "compare.png", "The PNG to write.")
    flags.DEFINE_string("metric", "loss", "The logged metric to plot (loss, accuracy, "
                        "rewards/margin, ...).")
    flags.DEFINE_enum("kinds", "both", ["both", "train", "eval"], "Which series to draw.")


def read_series(workdir: str, metric: str, kind: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` in `workdir`'s log.jsonl rows of `kind`."""
    from deepseek_tf.errors import UserError
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
    """Writes the plot; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepseek_tf.errors import UserError
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    drawn = 0
    for i, wd in enumerate(workdirs):
        name = os.path.basename(os.path.normpath(wd))
        color = f"C{i % 10}"
        for kind, style in (("train", "-"), ("eval", "o--")):
            if kinds not in ("both", kind):
                continue
            series = read_series(wd, metric, kind)
            if series:
                xs, ys = zip(*series)
                ax.plot(xs, ys, style, color=color, label=f"{name} {kind}", markersize=4)
                log(f"{name:<24} {kind:<5} {metric} at step {xs[-1]}: {ys[-1]:.4f}")
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise UserError(f"no {metric!r} values in the logs of {', '.join(workdirs)}.")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
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
