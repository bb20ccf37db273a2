"""`python -m deepseek_tf.prepare [--data.* flags]`

Tokenizes a corpus into sharded TFRecords + metadata.json under --data.data_dir
(default: <workdir>/data, the directory `train` reads).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402

dflags.define_flags(sections=("data",), workdir_help="Run directory; the data goes to "
                    "<workdir>/data unless --data.data_dir is set.")
flags.adopt_module_key_flags(dflags)


def main(argv):
    if len(argv) > 1:
        raise dflags.cfg.UserError(f"unexpected arguments {argv[1:]} (see --help).")
    from deepseek_tf.config import DataConfig
    data_cfg = DataConfig.from_dict(dflags.given_overrides(dflags.FLAGS)["data"])
    data_dir = data_cfg.data_dir or os.path.join(dflags.FLAGS.workdir, "data")
    from deepseek_tf.data.prepare import prepare  # imports TensorFlow
    prepare(data_cfg, data_dir)


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
