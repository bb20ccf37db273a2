"""Hugging Face export: config.json + model.safetensors (float32) for transformers.

The architecture is the HF class that represents the config exactly
(`convert.hf_config.export_architecture`; anything else is refused with one line).
Experts are written one by one (`mlp.experts.{i}.*`), the layout HF checkpoints
use. MTP modules are written in DeepSeek-V3's layout (`model.layers.{L + k - 1}.*`);
transformers skips them, inference engines that speculate with MTP read them.
A Hugging Face tokenizer the run trained with (`<workdir>/tokenizer/tokenizer.json`)
is copied along.
"""

from __future__ import annotations

import json
import os
import shutil

from deepseek_tf.config import Experiment
from deepseek_tf.convert.hf_config import hf_config_from_model
from deepseek_tf.convert.safetensors_io import write_safetensors
from deepseek_tf.convert.weights import export_tensors


def export_hf(model, exp: Experiment, output: str, log=print, workdir: str | None = None) -> str:
    """Writes `output`/config.json and `output`/model.safetensors; returns `output`."""
    hf_cfg = hf_config_from_model(exp.model)  # refuses unrepresentable configs first
    mtp = hf_cfg["architectures"][0] == "DeepseekV3ForCausalLM"
    if not mtp:
        hf_cfg.pop("num_nextn_predict_layers", None)
        if model.mtp:
            log("note: MTP modules are not exported (no place for them in this architecture)")
    tensors = export_tensors(model, include_mtp=mtp)
    os.makedirs(output, exist_ok=True)
    write_safetensors(os.path.join(output, "model.safetensors"), tensors)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    tokenizer = os.path.join(workdir or "", "tokenizer", "tokenizer.json")
    if workdir and os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(output, "tokenizer.json"))
    n = sum(a.size for a in tensors.values())
    log(f"wrote {hf_cfg['architectures'][0]} ({len(tensors)} tensors, {n:,} parameters) "
        f"to {output}")
    return output
