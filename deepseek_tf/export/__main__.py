"""`python -m deepseek_tf.export --workdir=DIR --format=hf|saved_model|tflite|litertlm --output=OUT`

Exports the latest checkpoint of a training workdir (or --checkpoint) to a
deployment format.
  hf           config.json + model.safetensors that Hugging Face transformers loads
               with `AutoModelForCausalLM.from_pretrained(OUT)`; sharded with an index
               past --shard_mb; --quantize=fp8 writes DeepSeek's released layout
               (float8_e4m3fn projections + weight_scale_inv per 128x128 block).
  saved_model  a SavedModel for TF Serving; write it to MODEL_BASE/NAME/VERSION
               (e.g. models/deepseek/1). Signatures: serving_default (text in, text
               out, optional max_new_tokens/temperature/top_k/top_p/seed per prompt),
               chat (roles/contents/num_messages in, reply out; runs trained on
               conversations), generate_ids (ids in, ids out) and score (per-token
               log-probs).
               The KV cache holds --max_length tokens (prompt + new tokens).
  tflite       a .tflite file for edge devices with `decode` and `prefill_<N>`
               signatures over an explicit KV cache of --max_length tokens (the
               LiteRT-LM contract; builtin ops only); run it with
               `python -m deepseek_tf.generate --tflite=OUT`.
  litertlm     a .litertlm bundle (that TFLite model + the run's tokenizer + LLM
               metadata) for Google's LiteRT-LM runtime:
               `litert-lm run OUT --no-template --prompt "..."`.
"""

import os

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()  # XLA programs compiled once per machine (README, "Generating text")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402

flags.DEFINE_string("workdir", None, "Training workdir to export (config.json + checkpoints/).")
flags.DEFINE_enum("format", "hf", ["hf", "saved_model", "tflite", "litertlm"],
                  "Export format: hf = Hugging Face config.json + model.safetensors; "
                  "saved_model = TF Serving SavedModel; tflite = a KV-cached .tflite for "
                  "edge devices; litertlm = a .litertlm bundle for the LiteRT-LM runtime.")
flags.DEFINE_string("output", None, "Where to write: a directory for hf and saved_model "
                    "(saved_model: MODEL_BASE/NAME/VERSION, e.g. exports/deepseek/1); a file "
                    "for tflite and litertlm (e.g. out/tiny.tflite, out/tiny.litertlm).")
flags.DEFINE_string("checkpoint", "", "A checkpoint path to export instead of the latest.")
flags.DEFINE_float("shard_mb", 4096.0, "hf: MiB per safetensors shard; more tensors than "
                   "that go into model-0000i-of-0000N.safetensors + model.safetensors.index.json.",
                   lower_bound=0.001)
flags.DEFINE_integer("max_length", 0, "saved_model/tflite/litertlm: KV cache length in tokens "
                     "(prompt + generated); 0 = the model's max_position_embeddings (tflite/"
                     "litertlm: at most 1024).", lower_bound=0)
flags.DEFINE_list("prefill_lengths", ["32"], "tflite/litertlm: one prefill_<N> signature per N "
                  "(tokens per prefill call; the runtime pads a shorter chunk).")
flags.DEFINE_integer("max_new_tokens", 64, "saved_model: default of the max_new_tokens input "
                     "when a request leaves it out (a server's default; the generate CLI and "
                     "evaluate use 128).", lower_bound=1)
dflags.define_jit_compile("auto", "saved_model: XLA-compile the decode loop: true, false, or "
                          "auto = time decoding both ways on this machine and keep the "
                          "faster, then with XLA the prefill at 128 and 512 prompt tokens "
                          "(serve on similar hardware). XLA is several times faster for small "
                          "models; TF Serving must then run with "
                          "--xla_cpu_compilation_enabled=true (serving/Dockerfile does), and "
                          "the export adds each generating signature without XLA as "
                          "<name>_no_xla for a server without it.")
dflags.define_quantize("hf: fp8 = block-scaled FP8 projections as DeepSeek releases V3 "
                       "(quantization_config in config.json). saved_model: int8 stores the "
                       "dense projections and embeddings as int8 weights (Keras quantize); "
                       "int4 = 4-bit round-to-nearest per --group_size; gptq/awq = 4-bit "
                       "calibrated on --calibration_data (Keras GPTQ in activation order; AWQ in "
                       "Keras' format with its per-channel scales searched on each decoder "
                       "block's output); kv_b_proj, a tied "
                       "embedding, norms, routers and MoE expert stacks stay float. "
                       "tflite/litertlm: fp16 = float16 weights, int8 = dynamic-range int8 "
                       "weights (float activations), int4 = 4-bit weights per --group_size "
                       "(32, 64, 128, 256 or -1; LiteRT's ai-edge-quantizer; activations "
                       "quantized on the fly).",
                       ["none", "fp16", "int8", "fp8", "int4", "gptq", "awq"])


def main(argv):
    FLAGS = flags.FLAGS
    from deepseek_tf.config import Experiment
    from deepseek_tf.convert.hf_config import hf_config_from_model
    path = os.path.join(FLAGS.workdir, "config.json")
    if os.path.exists(path) and FLAGS.format == "hf":
        hf_config_from_model(Experiment.load(path).model)  # refuse before importing TF
    options = {}
    if FLAGS.quantize == "fp8" and FLAGS.format != "hf":
        raise UserError("--quantize=fp8 applies to --format=hf.")
    if FLAGS.quantize in ("gptq", "awq") and FLAGS.format != "saved_model":
        raise UserError(f"--quantize={FLAGS.quantize} applies to --format=saved_model; "
                        f"tflite/litertlm take fp16, int8 or int4.")
    if FLAGS.format == "hf":
        options = dict(quantize=FLAGS.quantize, shard_mb=FLAGS.shard_mb)
        if (FLAGS.quantize not in ("none", "fp8") or FLAGS["max_length"].present
                or FLAGS["jit_compile"].present):
            raise UserError("--format=hf takes --quantize=none or fp8 (and --shard_mb); "
                            "--max_length and --jit_compile apply to the other formats.")
    elif FLAGS.format == "saved_model":
        if FLAGS.quantize == "fp16":
            raise UserError("--quantize=fp16 applies to tflite/litertlm; the "
                            "SavedModel takes none, int8, int4, gptq or awq.")
        options = dict(max_length=FLAGS.max_length, max_new_tokens=FLAGS.max_new_tokens,
                       quantize=FLAGS.quantize, jit_compile=FLAGS.jit_compile,
                       group_size=FLAGS.group_size, calibration_data=FLAGS.calibration_data,
                       calibration_samples=FLAGS.calibration_samples,
                       quantize_head=FLAGS.quantize_head)
    elif FLAGS["jit_compile"].present:
        raise UserError("--jit_compile applies to --format=saved_model.")
    elif FLAGS.format in ("tflite", "litertlm"):
        try:
            lengths = [int(n) for n in FLAGS.prefill_lengths]
        except ValueError:
            raise UserError(f"--prefill_lengths={','.join(FLAGS.prefill_lengths)}: "
                                       f"give integers, e.g. 32,128.") from None
        options = dict(max_length=FLAGS.max_length, prefill_lengths=lengths,
                       quantize=FLAGS.quantize, group_size=FLAGS.group_size)
    from deepseek_tf.export import export, load_workdir
    model, exp = load_workdir(FLAGS.workdir, FLAGS.checkpoint)
    export(model, exp, FLAGS.format, FLAGS.output, workdir=FLAGS.workdir, **options)


def entry():
    dflags.run(main, required=("workdir", "output"))


if __name__ == "__main__":
    entry()
