"""`python -m deepseek_tf.prepare [--flagfile=...] --data.inputs=PATH[,PATH] --data.output_dir=DIR`

Reads, cleans, deduplicates and tokenizes a corpus (or instruction data with
--data.format=alpaca|sharegpt) into sharded TFRecords + metadata.json +
report.json + the tokenizer under --data.output_dir (alias of --data.data_dir;
default: <workdir>/data, the directory `train` reads). Without --data.inputs it
prepares the embedded corpus. Every flag of `train` is accepted, so one
flagfile serves both; only --data.* and --tokenizer.* matter here. An
interrupted run resumes when started again with the same flags.
"""

import os

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402

dflags.define_flags(workdir_help="Run directory; the data goes to <workdir>/data unless "
                    "--data.output_dir (= --data.data_dir) is set.")
flags.adopt_module_key_flags(dflags)


def main(argv):
    exp = dflags.experiment_from_flags(dflags.FLAGS)  # validates every section
    data_dir = exp.data.data_dir or os.path.join(dflags.FLAGS.workdir, "data")
    from deepseek_tf.data.prepare import prepare  # imports TensorFlow
    from deepseek_tf.scoring import perplexity_scorer
    prepare(exp.data, data_dir, exp.tokenizer, progress=True,
            scorer=perplexity_scorer(exp.data))


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
