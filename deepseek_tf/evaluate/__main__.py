"""`python -m deepseek_tf.evaluate --workdir=DIR --data.inputs=FILE [--task=lm|generate|classify]`

Evaluates a workdir's latest checkpoint (a LoRA run with its adapters) on a data file:
  lm        perplexity and next-token accuracy; {"text"} records or text files count
            every token, alpaca/sharegpt records their answer tokens.
  generate  greedy answers to alpaca (instruction/input -> output) or {"prompt",
            "reference"} records: exact match, BLEU (sacrebleu), ROUGE-1/2/L (rouge-score).
  classify  {"text", "label"} records: each label scored by its likelihood after the
            text (summed, or per token with --normalize=tokens); a text too long for
            --max_length loses its beginning, never a label; accuracy, macro/micro F1.
  auto      (default) picks one from the first record's fields.
Writes <workdir>/eval/<task>-<data name>.json (metrics + per-sample predictions) and
prints a table. Bad input: one `error:` line, exit status 2.
"""

from deepseek_tf.quiet import quiet_tensorflow

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()  # XLA programs compiled once per machine (README, "Generating text")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.data.templates import TEMPLATES  # noqa: E402

flags.DEFINE_string("workdir", None, "Workdir to evaluate (config.json + checkpoints/).")
flags.DEFINE_string("data.inputs", None, "Comma-separated .jsonl/.json data files (or text "
                    "files for --task=lm).")
flags.DEFINE_enum("task", "auto", ["auto", "lm", "generate", "classify"], "What to measure "
                  "(see above).")
flags.DEFINE_enum("data.template", "", [""] + list(TEMPLATES), "Chat template of prompts "
                  "(default: the run's, if it trained on alpaca/sharegpt data; else none).")
flags.DEFINE_integer("max_samples", 0, "Evaluate at most this many records (0 = all).",
                     lower_bound=0)
flags.DEFINE_integer("max_length", 0, "Tokens per window / generation cache (0 = the run's "
                     "seq_len; generate: the longest prompt + max_new_tokens).", lower_bound=0)
flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens generated per prompt at most "
                     "(the same default as the generate CLI).", lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Records (or label candidates) per batch.",
                     lower_bound=1)
flags.DEFINE_enum("normalize", "none", ["none", "tokens"], "classify: compare labels by "
                  "their summed log-likelihood (none) or its mean per label token (tokens: "
                  "labels of different lengths on an equal footing).")
dflags.define_jit_compile("auto", "generate: XLA-compile each decode step: true, false, or "
                          "auto = time a few steps both ways on this machine first (and, "
                          "with XLA, the prefill at 128 and 512 prompt tokens).")
flags.DEFINE_string("output", "", "Results file (default <workdir>/eval/<task>-<name>.json).")
flags.DEFINE_string("checkpoint", "", "A checkpoint path instead of the latest.")
dflags.define_quantize()


def main(argv):
    FLAGS = flags.FLAGS
    inputs = [p.strip() for p in FLAGS["data.inputs"].value.split(",") if p.strip()]
    from deepseek_tf.evaluate import evaluate_workdir
    evaluate_workdir(FLAGS.workdir, inputs, FLAGS.task, FLAGS["data.template"].value,
                     FLAGS.max_samples, FLAGS.max_length, FLAGS.output, FLAGS.checkpoint,
                     batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens,
                     jit_compile=FLAGS.jit_compile,
                     normalize=FLAGS.normalize, quantize=dflags.quantize_options(FLAGS))


def entry():
    dflags.run(main, required=("workdir", "data.inputs"))


if __name__ == "__main__":
    entry()
