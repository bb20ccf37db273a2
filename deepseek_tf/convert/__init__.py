"""Hugging Face checkpoints -> deepseek_tf workdirs (`python -m deepseek_tf.convert`).

`convert_hf(hf_dir, workdir, exp)` reads `config.json` and `*.safetensors` of a
DeepseekV4 / DeepseekV32 / DeepseekV3 / DeepseekV2 / Llama / Qwen2 causal LM, builds
the matching `DeepSeekCausalLM`, fills every weight (a missing, extra or misshapen
tensor is an error naming it) and writes a workdir the trainer continues from. Sharded
checkpoints (`model.safetensors.index.json`) and DeepSeek's FP8 releases
(`quantization_config.quant_method = fp8`; V4's routed experts FP4 with `expert_dtype =
fp4`), dequantized to float32 or `dtype="bfloat16"` or kept as int8 with
`keep_quantized="int8"`, stream in a few
tensors at a time (`stream.py`); an interrupted conversion resumes when run again:

    <workdir>/config.json          the Experiment (model from HF, the rest from flags)
    <workdir>/checkpoints/ckpt-0   model weights + step 0, the trainer's layout
    <workdir>/convert.json         provenance: source, architecture, notes

Example:
    >>> convert_hf("hf/tiny-v3", "runs/tiny-v3", Experiment())
"""

from __future__ import annotations

import json
import os

from deepseek_tf.config import Experiment, TokenizerConfig
from deepseek_tf.convert import hf_v4
from deepseek_tf.convert.hf_checks import check_hf_config, fit_data_to_model
from deepseek_tf.convert.hf_config import architecture_of, model_config_from_hf
from deepseek_tf.convert.quant import SCALE_SUFFIX, Quantization
from deepseek_tf.convert.safetensors_io import SafetensorsDir
from deepseek_tf.convert.stream import PARTS_DIR
from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError
from deepseek_tf.workdir_files import CHECKPOINT_DIR, CONFIG_FILE, CONVERT_FILE


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}. Point --hf_dir at a Hugging Face "
                        f"checkpoint directory (config.json + *.safetensors).") from e


def _has_mtp_weights(tensors: SafetensorsDir, num_layers: int) -> bool:
    """V3's layout (`model.layers.{L}.eh_proj`) or V4's (`mtp.0.e_proj`)."""
    return any(n in tensors.index for n in (f"model.layers.{num_layers}.eh_proj.weight",
                                            "mtp.0.e_proj.weight"))


#: Default part size: half the largest shard, within these bounds (bytes of float32).
PART_BYTES = (16 << 20, 2 << 30)


def convert_hf(hf_dir: str, workdir: str, exp: Experiment, model_overrides: dict | None = None,
               log=print, explicit_data=(), part_bytes: int = 0,
               keep_quantized: str = "none", dtype: str = "float32") -> Experiment:
    """Converts the HF model in `hf_dir` into a new workdir; returns its Experiment.

    Args:
      hf_dir: directory with config.json and *.safetensors.
      workdir: output directory; must not hold a run yet.
      exp: data / optim / train settings (its model section is replaced).
      model_overrides: model fields that are not part of the checkpoint's shape
        (loss weights, capacity factors, num_nextn_predict_layers when the checkpoint
        has no MTP weights: those modules then start from random init).
      log: printer for progress and notes.
      explicit_data: data fields the user set; the others adapt to the model
        (seq_len no longer than its max_position_embeddings).
      part_bytes: float32 bytes converted per step (bounds memory; the unit of
        resuming); 0 = half the largest shard, between 16 MiB and 2 GiB.
      keep_quantized: "int8" stores projections and routed experts as int8 + scales
        (`ModelConfig.weight_quantization`); "none" stores them as `dtype`.
      dtype: storage dtype of the float weights, "float32" or "bfloat16"
        (`ModelConfig.weight_dtype`).
    """
    hf = read_hf_config(hf_dir)
    arch = architecture_of(hf)
    where = os.path.join(hf_dir, "config.json")
    check_hf_config(hf, arch, where=where)
    quant = Quantization.from_hf(hf, where)
    cfg, notes = model_config_from_hf(hf)
    tensors = SafetensorsDir(hf_dir)
    if arch == hf_v4.ARCHITECTURE and hf_v4.is_release_layout(tensors.index):
        tensors = SafetensorsDir(hf_dir, rename=hf_v4.from_release_name)
        notes.append("DeepSeek's own V4 tensor names read as transformers names them")
    mtp_in_files = _has_mtp_weights(tensors, cfg.num_hidden_layers)
    depth = int(hf.get("num_nextn_predict_layers") or 0) if mtp_in_files else 0
    if not mtp_in_files and hf.get("num_nextn_predict_layers"):
        notes.append("no MTP weights in the checkpoint: converted without MTP modules")
    overrides = dict(model_overrides or {})
    fresh_mtp = overrides.get("num_nextn_predict_layers", depth) if not mtp_in_files else depth
    overrides["num_nextn_predict_layers"] = fresh_mtp
    if keep_quantized not in ("none", "int8"):
        raise UserError(f"--convert.keep_quantized={keep_quantized!r}: none or int8.")
    if keep_quantized == "int8" and fresh_mtp and not mtp_in_files:
        raise UserError("--model.num_nextn_predict_layers adds MTP modules that start from "
                        "random weights, which an int8 base cannot train: convert without "
                        "one of --model.num_nextn_predict_layers and "
                        "--convert.keep_quantized.")
    overrides["weight_quantization"] = keep_quantized
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--convert.dtype={dtype!r}: float32 or bfloat16.")
    overrides["weight_dtype"] = dtype
    cfg = cfg.replace(**overrides)
    tokenizer = exp.tokenizer
    if tokenizer == TokenizerConfig() and os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        tokenizer = TokenizerConfig(type="hf", path=os.path.abspath(hf_dir))
        notes.append("data will be tokenized with the checkpoint's tokenizer.json "
                     "(--tokenizer.type=hf)")
    data = fit_data_to_model(exp.data, cfg.max_position_embeddings, explicit_data, log=log)
    exp = Experiment(model=cfg, data=data, tokenizer=tokenizer, optim=exp.optim,
                     train=exp.train)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    ours = (PARTS_DIR, "checkpoint", "ckpt-0.")  # what an interrupted conversion leaves
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)) or any(
            not f.startswith(ours)
            for f in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])):
        raise UserError(f"--workdir={workdir} already holds a run; choose a new directory.")
    log(f"{arch} from {hf_dir}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.attention_type} attention"
        + (f", {cfg.n_routed_experts} routed experts" if cfg.n_routed_experts else ""))
    for note in notes:
        log(f"note: {note}")

    from deepseek_tf.convert.stream import declared_model, hf_shape, write_streaming
    from deepseek_tf.convert.weights import checked_entries
    from deepseek_tf.params import count_parameters

    model = declared_model(cfg)  # shapes only: weights stream from the shards to disk
    if fresh_mtp and not mtp_in_files:
        log(f"note: {fresh_mtp} MTP module(s) start from random initialisation")
    names = [n for n in tensors.names() if not n.endswith(SCALE_SUFFIX)]
    entries = checked_entries(model, names, lambda n: hf_shape(tensors, n),
                              include_mtp=mtp_in_files)
    largest = max(s.size for s in tensors.shards)
    part_bytes = part_bytes or min(max(largest // 2, PART_BYTES[0]), PART_BYTES[1])
    os.makedirs(ckpt_dir, exist_ok=True)
    path = write_streaming(model, entries, tensors, ckpt_dir, quant, part_bytes, log=log)
    tensors.close()
    counts = count_parameters(cfg)
    total = counts["total"] + counts["mtp_total"]
    with atomic_open(os.path.join(workdir, CONVERT_FILE), "w") as f:
        json.dump({"source": os.path.abspath(hf_dir), "architecture": arch, "notes": notes,
                   "quantization": quant.method or "none",
                   "weight_block_size": list(quant.block) if quant.method else None,
                   "stored_as": "int8" if keep_quantized == "int8" else dtype,
                   "dtype": dtype,
                   "parameters": total,
                   "checkpoint": os.path.basename(path)}, f, indent=2)
    exp.save(os.path.join(workdir, CONFIG_FILE))  # last: marks the conversion complete
    log(f"wrote {path} ({total:,} parameters) and {os.path.join(workdir, CONFIG_FILE)}")
    return exp
