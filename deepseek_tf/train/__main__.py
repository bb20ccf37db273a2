"""`python -m deepseek_tf.train --flagfile=configs/tiny.flags [--workdir=DIR]`

Trains a DeepSeek-style decoder. Every config field is a flag (`--model.*`,
`--data.*`, `--optim.*`, `--train.*`); `--help` lists them. A workdir that already
holds a run is resumed from its latest checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402

dflags.define_flags()
flags.adopt_module_key_flags(dflags)


def main(argv):
    if len(argv) > 1:
        raise dflags.cfg.UserError(f"unexpected arguments {argv[1:]}; flags look like "
                                   f"--train.steps=100 (see --help).")
    workdir = dflags.FLAGS.workdir
    exp = dflags.resolve_experiment(dflags.FLAGS, workdir)
    from deepseek_tf.train.loop import train  # imports TensorFlow: after validation
    train(exp, workdir)


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
