"""`python -m deepseek_tf.export --workdir=DIR --format=hf --output=OUT`

Exports the latest checkpoint of a training workdir (or --checkpoint) to a
deployment format. `hf`: config.json + model.safetensors that Hugging Face
transformers loads with `AutoModelForCausalLM.from_pretrained(OUT)`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402

flags.DEFINE_string("workdir", None, "Training workdir to export (config.json + checkpoints/).")
flags.DEFINE_enum("format", "hf", ["hf"], "Export format: hf = Hugging Face config.json + "
                  "model.safetensors.")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_string("checkpoint", "", "A checkpoint path to export instead of the latest.")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise dflags.cfg.UserError(f"unexpected arguments {argv[1:]} (see --help).")
    for name in ("workdir", "output"):
        if not FLAGS[name].value:
            raise dflags.cfg.UserError(f"--{name} is required (see --help).")
    from deepseek_tf.convert.hf_config import hf_config_from_model
    from deepseek_tf.config import Experiment
    path = os.path.join(FLAGS.workdir, "config.json")
    if os.path.exists(path) and FLAGS.format == "hf":
        hf_config_from_model(Experiment.load(path).model)  # refuse before importing TF
    from deepseek_tf.export import export, load_workdir
    model, exp = load_workdir(FLAGS.workdir, FLAGS.checkpoint)
    export(model, exp, FLAGS.format, FLAGS.output, workdir=FLAGS.workdir)


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
