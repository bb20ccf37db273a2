"""Hugging Face export: config.json + safetensors that transformers loads.

The architecture is the HF class that represents the config exactly
(`convert.hf_config.export_architecture`; anything else is refused with one line).
Experts are written one by one (`mlp.experts.{i}.*`), the layout HF checkpoints
use. MTP modules are written in DeepSeek-V3's layout (`model.layers.{L + k - 1}.*`)
or DeepSeek-V4's (`mtp.{k - 1}.*`); transformers skips them, inference engines that
speculate with MTP read them, and `convert` reads them back.
Weights are float32, or with `quantize="fp8"` as DeepSeek releases V3: every 2-D
projection (`*_proj.weight`) float8_e4m3fn with a float32 `weight_scale_inv` per
block and `quantization_config` in config.json (embeddings, norms, router and lm_head
stay float32); the block is the one the workdir was converted from (`convert.json`,
found through a merged workdir's `merge.json` and `--train.init_from`), else DeepSeek's
128x128, so a fine-tuned release goes back in its own layout. Past `shard_mb` the
tensors go into shards with a
`model.safetensors.index.json`. A Hugging Face tokenizer the run trained with
(`<workdir>/tokenizer/tokenizer.json`) is copied along.
"""

from __future__ import annotations

import json
import os
import shutil

from deepseek_tf.config import Experiment
from deepseek_tf.convert.hf_config import hf_config_from_model
from deepseek_tf.convert.quant import SCALE_SUFFIX, Quantization, quantize_fp8
from deepseek_tf.convert.safetensors_io import write_sharded
from deepseek_tf.convert.weights import export_tensors
from deepseek_tf.errors import UserError
from deepseek_tf.workdir_files import CONFIG_FILE, CONVERT_FILE, MERGE_FILE


def quantize_tensors(tensors: dict, quant: Quantization) -> dict:
    """`tensors` with every 2-D `*_proj.weight` as FP8 + its `weight_scale_inv`."""
    out = {}
    for name, a in tensors.items():
        if a.ndim == 2 and name.endswith("proj.weight"):
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8(a, quant.block)
        else:
            out[name] = a
    return out


def _source_block(workdir: str | None) -> tuple[int, int]:
    """The FP8 block of the checkpoint `workdir` was converted from, else DeepSeek's
    128x128. The trail goes back through a merged workdir's merge.json (its LoRA run or
    base) and a run's --train.init_from."""
    seen = set()
    while workdir and workdir not in seen:
        seen.add(workdir)
        try:
            with open(os.path.join(workdir, CONVERT_FILE)) as f:
                block = json.load(f).get("weight_block_size")
            return tuple(block) if block else (128, 128)
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(workdir, MERGE_FILE)) as f:
                workdir = json.load(f).get("from", "")
            continue
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(workdir, CONFIG_FILE)) as f:
                workdir = json.load(f).get("train", {}).get("init_from", "")
        except (OSError, ValueError):
            break
    return (128, 128)


def export_hf(model, exp: Experiment, output: str, log=print, workdir: str | None = None,
              quantize: str = "none", shard_mb: float = 4096.0) -> str:
    """Writes `output`/config.json and the weights (see the module doc); returns `output`."""
    if quantize not in ("none", "fp8"):
        raise UserError(f"--quantize={quantize}: the hf format takes none or fp8.")
    hf_cfg = hf_config_from_model(exp.model)  # refuses unrepresentable configs first
    # V4's MTP tensors keep DeepSeek's names (mtp.*), which transformers skips on load.
    mtp = hf_cfg["architectures"][0] in ("DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM")
    if not mtp:
        hf_cfg.pop("num_nextn_predict_layers", None)
        if model.mtp:
            log("note: MTP modules are not exported (no place for them in this architecture)")
    tensors = export_tensors(model, include_mtp=mtp)
    n = sum(a.size for a in tensors.values())
    if quantize == "fp8":
        quant = Quantization("fp8", _source_block(workdir))
        tensors = quantize_tensors(tensors, quant)
        hf_cfg["quantization_config"] = quant.to_hf()
    os.makedirs(output, exist_ok=True)
    files = write_sharded(output, tensors, int(shard_mb * 2**20))
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    tokenizer = os.path.join(workdir or "", "tokenizer", "tokenizer.json")
    if workdir and os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(output, "tokenizer.json"))
    log(f"wrote {hf_cfg['architectures'][0]} ({len(tensors)} tensors, {n:,} parameters"
        f"{', FP8 block-scaled' if quantize == 'fp8' else ''}, {len(files)} file(s)) "
        f"to {output}")
    return output
