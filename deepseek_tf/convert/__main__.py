"""`python -m deepseek_tf.convert --hf_dir=DIR --workdir=OUT [--data.* --optim.* --train.*]`

Converts a Hugging Face causal LM (DeepseekV4ForCausalLM, DeepseekV32ForCausalLM,
DeepseekV3ForCausalLM, DeepseekV2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM;
config.json + *.safetensors or a sharded model.safetensors.index.json set, never pickle
files; bf16/fp16/fp32 tensors or DeepSeek's block-scaled FP8 release, with V4's FP4
routed experts, under transformers' or DeepSeek's own V4 names, dequantized to float32
or --convert.dtype=bfloat16, or with --convert.keep_quantized=int8 kept as int8
weights plus scales) into a deepseek_tf workdir, streaming a few tensors at a time
(an interrupted conversion continues when the same command runs again). `python -m deepseek_tf.train --workdir=OUT` then
continues training from it. The architecture comes from config.json; data, optimizer
and loop settings from the flags given here or to the first `train` run. Model
flags that do not change the checkpoint's shape (loss weights, capacity factors,
and --model.num_nextn_predict_layers to add fresh MTP modules) may be given too.
"""

from deepseek_tf.quiet import quiet_tensorflow

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import ConfigError, UserError  # noqa: E402

dflags.define_flags(workdir_help="Output workdir (must not hold a run yet).")
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory: config.json + "
                    "*.safetensors.")
flags.DEFINE_float("part_mb", 0.0, "MiB of float32 weights converted and written per step "
                   "(bounds memory; an interrupted conversion resumes from the last whole "
                   "step when run again); 0 = half the largest shard, 16 MiB to 2 GiB.",
                   lower_bound=0.0)
flags.DEFINE_enum("convert.dtype", "float32", ["float32", "bfloat16"],
                  "Storage dtype of the converted float weights (FP8/FP4 sources are "
                  "dequantized into it): float32, or bfloat16 (half the memory and disk; "
                  "the model then computes in bfloat16; sets --model.weight_dtype).")
flags.DEFINE_enum("convert.keep_quantized", "none", ["none", "int8"],
                  "Store the projections and routed experts as int8 (weight-only, one scale "
                  "per output channel, Keras' int8 Dense; ~1/4 of float32's bytes) and "
                  "compute with them dequantized on the fly; sets "
                  "--model.weight_quantization of the workdir. FP8 sources are dequantized "
                  "first, then requantized. Such a base trains only with "
                  "--train.finetuning_type=lora.")
flags.adopt_module_key_flags(dflags)

_SHAPE_FREE = ("num_nextn_predict_layers",)


def main(argv):
    cfg = dflags.cfg
    if not dflags.FLAGS.hf_dir:
        raise UserError("--hf_dir is required: a directory with config.json and "
                        "*.safetensors.")
    given = dflags.given_overrides(dflags.FLAGS)
    fields = {k: f for k, f, _ in cfg.ModelConfig.flag_fields()}
    for name in given["model"]:
        if not (fields[name].metadata.get("resumable") or name in _SHAPE_FREE):
            raise ConfigError(f"--model.{name} comes from {dflags.FLAGS.hf_dir}/config.json "
                              f"and cannot be set here.")
    sections = {s: cls.from_dict(given[s]) for s, cls in cfg.SECTIONS.items() if s != "model"}
    # The model section comes from config.json; this placeholder only fits any seq_len.
    placeholder = cfg.ModelConfig(max_position_embeddings=max(
        sections["data"].seq_len, cfg.ModelConfig().max_position_embeddings))
    exp = cfg.Experiment(model=placeholder, **sections)
    from deepseek_tf.convert import convert_hf  # imports TensorFlow lazily
    convert_hf(dflags.FLAGS.hf_dir, dflags.FLAGS.workdir, exp, model_overrides=given["model"],
               explicit_data=tuple(given["data"]),
               keep_quantized=dflags.FLAGS["convert.keep_quantized"].value,
               dtype=dflags.FLAGS["convert.dtype"].value,
               part_bytes=int(dflags.FLAGS.part_mb * 2**20))


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
