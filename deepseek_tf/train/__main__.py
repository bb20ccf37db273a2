"""`python -m deepseek_tf.train --flagfile=configs/tiny.flags [--workdir=DIR]`

Trains a DeepSeek-style decoder. Every config field is a flag (`--model.*`,
`--data.*`, `--optim.*`, `--train.*`, and the stages' `--lora.*`, `--dpo.*`,
`--grpo.*`, `--distill.*`); `--help` lists them. A workdir that already holds a run is resumed from
its latest checkpoint.

With TF_CONFIG set this process is one worker of a multi-worker run (see
`python -m deepseek_tf.launch --help` to start several on one machine). SIGTERM
(preemption) saves a checkpoint on every worker and exits with code 42.
"""

import sys

from deepseek_tf.quiet import quiet_tensorflow

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

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

    try:
        train(exp, workdir)
    except Preempted as e:
        print(f"{e} (exit code {e.exit_code})", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
