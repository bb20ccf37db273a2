"""Fine-tuning setup: start from a workdir's weights, then choose what trains.

`prepare_model` runs right after the model is built (inside the strategy scope,
before the optimizer sees `model.trainable_variables`):
  1. `--train.init_from=WORKDIR`: the model weights of that workdir's latest
     checkpoint (a LoRA run's adapters are merged first); never its optimizer. A
     resumed run skips this: its own checkpoint is restored over the model.
  2. `--train.finetuning_type`: full (everything trains), lora (deepseek_tf/lora.py:
     adapters on `--lora.targets`, everything else frozen) or freeze (the last
     `--freeze.trainable_layers` blocks and any module named in `--freeze.modules`).
  3. `--train.dsa_stage=dense_warmup`: only the DSA indexers train.

Frozen variables are left out of the optimizer, so they get no update, no weight
decay and no optimizer slots. A resumed run rebuilds the same structure and then
restores its own checkpoint over it.

Example:
    >>> model = DeepSeekCausalLM(exp.model)
    >>> prepare_model(model, exp, log=print)
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from deepseek_tf.config import Experiment, FreezeConfig
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.lora import _rel, apply_lora, merged_model


def _loose(model_cfg) -> dict:
    """The model fields a fine-tuning run may set itself (loss weights, capacities)."""
    return {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
            if f.metadata["resumable"]}


def _own_rows(model, variable, value):
    """`value`, or for an expert-parallel worker's expert stack (fewer rows than the
    gathered `value`) the rows of its own experts."""
    shape = tuple(variable.shape)
    if not shape or shape[0] == value.shape[0]:
        return value
    rows = shape[0]
    from deepseek_tf.layers.moe import DeepSeekMoE

    rank = next(m.exchange.rank for m in model._flatten_layers()
                if isinstance(m, DeepSeekMoE) and m.exchange is not None)
    return value[rank * rows:(rank + 1) * rows]


def load_init_weights(model, workdir: str, log=print) -> str:
    """Copies the model weights of `workdir`'s latest checkpoint into `model`; returns
    the checkpoint path. Refuses a model config that differs from the workdir's."""
    from deepseek_tf.workdir import load_experiment, load_workdir, restore_model

    src_exp = load_experiment(workdir)
    placed = model.config.expert_parallel  # the experts' placement may differ
    if src_exp.model.replace(**_loose(model.config), expert_parallel=placed) != model.config:
        raise ConfigError(f"--train.init_from={workdir} holds another model config than "
                          f"this run; start a new --workdir without model flags.")
    path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if not path:
        raise UserError(f"--train.init_from={workdir}: checkpoints/ holds no checkpoint.")
    lora = src_exp.train.finetuning_type == "lora"
    if lora or src_exp.model.expert_parallel > 1 or placed > 1:
        # LoRA: its adapters merged into plain weights; expert parallel: every worker's
        # experts gathered (workdir.load_workdir), this run's worker takes its own rows
        src, _ = load_workdir(workdir)
        values = {_rel(v.path): v for v in (merged_model(src) if lora else src).variables}
        for v in model.variables:
            v.assign(_own_rows(model, v, values[_rel(v.path)]))
    else:
        restore_model(model, path, what="--train.init_from: ")
    log(f"initialised the model weights from {path} (--train.init_from; optimizer, data "
        f"and loop start fresh)")
    return path


def _parts(v) -> list[str]:
    return _rel(v.path).split("/")


def apply_freeze(model, cfg: FreezeConfig) -> None:
    """Freezes every variable except those of the last `trainable_layers` decoder
    blocks and of modules named in `cfg.modules`."""
    n = model.config.num_hidden_layers
    blocks = {f"layers_{i}" for i in range(n - cfg.trainable_layers, n)}
    modules = set(cfg.module_list)
    for v in model.variables:
        parts = _parts(v)
        if v.trainable:  # non-trainable ones (e.g. router biases) stay so
            v.trainable = bool(blocks & set(parts[:1]) or modules & set(parts[:-1]))
    if not model.trainable_variables:
        raise ConfigError(f"--train.finetuning_type=freeze leaves nothing to train: raise "
                          f"--freeze.trainable_layers (now {cfg.trainable_layers}) or name "
                          f"--freeze.modules (e.g. lm_head,norm).")


def freeze_all_but_indexers(model) -> int:
    """DSA dense warm-up: every variable outside the indexers (V4's CSA layers: with
    their own compressors) is frozen (router bias updates stop with their routers).
    Returns the number of indexer variables."""
    for v in model.variables:
        if v.trainable:
            v.trainable = bool({"indexer", "index_compressor"} & set(_parts(v)[:-1]))
    return len(model.trainable_variables)


def check_quantized_base(exp: Experiment, resuming: bool) -> None:
    """An int8 or bfloat16 base (`--model.weight_quantization` / `--model.weight_dtype`)
    trains adapters only (no float32 master weights), from its converted weights."""
    m = exp.model
    flag, q = (("weight_quantization", m.weight_quantization)
               if m.weight_quantization != "none" else ("weight_dtype", m.weight_dtype))
    if exp.train.finetuning_type != "lora":
        raise ConfigError(f"the model's weights are stored as {q} (--model.{flag}={q}), "
                          f"which this trainer does not update directly: use "
                          f"--train.finetuning_type=lora (adapters on the frozen {q} base), "
                          f"or convert with float32 weights (no --convert.keep_quantized, "
                          f"--convert.dtype=float32).")
    if not (exp.train.init_from or resuming):
        raise ConfigError(f"--model.{flag}={q} needs the base weights: give "
                          f"--train.init_from=WORKDIR (the conversion).")


def prepare_model(model, exp: Experiment, log=print, resuming: bool = False) -> None:
    """Loads `--train.init_from` weights (unless `resuming`: the run's own checkpoint
    then holds every weight and is restored over the model), then applies
    `--train.finetuning_type` (and the DSA dense warm-up's freeze)."""
    tcfg = exp.train
    if exp.model.weight_quantization != "none" or exp.model.weight_dtype != "float32":
        check_quantized_base(exp, resuming)
    if tcfg.init_from and not resuming:
        load_init_weights(model, tcfg.init_from, log)
    if tcfg.finetuning_type == "lora":
        n = apply_lora(model, exp.lora, seed=tcfg.seed)
        log(f"LoRA: rank {exp.lora.rank}, alpha {exp.lora.alpha:g}, dropout "
            f"{exp.lora.dropout:g} on {n} projections ({exp.lora.targets}); routed expert "
            f"stacks, norms, embeddings and the head stay frozen")
    elif tcfg.finetuning_type == "freeze":
        apply_freeze(model, exp.freeze)
        log(f"freeze: training the last {exp.freeze.trainable_layers} blocks"
            + (f" and {exp.freeze.modules}" if exp.freeze.modules else ""))
    if tcfg.dsa_stage == "dense_warmup":
        n = freeze_all_but_indexers(model)
        log(f"DSA dense warm-up: the main model is frozen and attends densely; training "
            f"the {n} indexer variables on the KL loss")
