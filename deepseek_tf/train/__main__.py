"""`python -m deepseek_tf.train --flagfile=configs/tiny.flags [--workdir=DIR]`

Trains a DeepSeek-style decoder. Every config field is a flag (`--model.*`,
`--data.*`, `--optim.*`, `--train.*`, and the stages' `--lora.*`, `--dpo.*`,
`--grpo.*`, `--distill.*`); `--help` lists them. A workdir that already holds a run is resumed from
its latest checkpoint.

With TF_CONFIG set this process is one worker of a multi-worker run (see
`python -m deepseek_tf.launch --help` to start several on one machine). SIGTERM
(preemption) saves a checkpoint on every worker and exits with code 42. A worker
whose peer is gone (a collective fails, or waits longer than
`--train.collective_timeout`) prints one `error:` line and exits with code 1.
"""

import os
import re
import sys

from deepseek_tf.quiet import quiet_tensorflow

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()  # XLA programs compiled once per machine (README, "Generating text")

from absl import flags  # noqa: E402

from deepseek_tf import exit_codes  # noqa: E402
from deepseek_tf import flags as dflags  # noqa: E402

__doc__ += "\n" + exit_codes.HELP + "\n"  # shown by --help
dflags.define_flags()
flags.adopt_module_key_flags(dflags)


def main(argv):
    workdir = dflags.FLAGS.workdir
    exp = dflags.resolve_experiment(dflags.FLAGS, workdir)
    from deepseek_tf.train.loop import train  # imports TensorFlow: after validation
    from deepseek_tf.train.preemption import Preempted

    import tensorflow as tf

    try:
        train(exp, workdir)
    except Preempted as e:
        print(f"{e} (exit code {e.exit_code})", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError) as e:
        if not os.environ.get("TF_CONFIG"):
            raise  # one process: a bug, with its traceback
        print(f"error: lost a peer worker ({type(e).__name__}: {_cause(e.message)}); stop "
              f"every worker, then run the same command on each again to resume from the "
              f"last checkpoint", file=sys.stderr, flush=True)
        sys.exit(1)


def _cause(message: str) -> str:
    """The line of a failed collective's TensorFlow error that says why (its message
    also lists where the op was defined)."""
    lines = [l.strip() for l in message.splitlines() if l.strip() and not l[0].isspace()]
    why = [l for l in lines if re.search(r"(?i)abort|reset|timed? ?out|deadline|unavailable"
                                         r"|connect", l) and not l.startswith("Detected at")]
    return (why or lines or ["no message"])[0]


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
