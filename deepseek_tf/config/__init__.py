"""Experiment configuration: small frozen dataclasses, one per concern.

This package is the single source of truth for every knob of the framework. It
imports nothing from the rest of the package but `atomic` (file writes) and
`errors`. One module per concern: `base` (the `knob` field and the `_Section`
mixin), `model` (`ModelConfig`, `RopeScaling`), `data` (`DataConfig`,
`TokenizerConfig`), `train` (optimizer, loop, LoRA, freeze, DPO, GRPO, distillation); this module joins
them into the `Experiment` saved as config.json. Each dataclass validates itself on
construction and raises `ConfigError` (a one-line, user-facing message) for a bad
value, so that a wrong flag is reported before any graph is built.

Field names of `ModelConfig` follow Hugging Face's `LlamaConfig` /
`DeepseekV3Config` so that an HF `config.json` maps onto it.

Example:
    >>> cfg = ModelConfig(hidden_size=64, num_attention_heads=4,
    ...                   num_hidden_layers=2, intermediate_size=128)
    >>> cfg.resolved_head_dim
    16
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Mapping

from deepseek_tf.atomic import atomic_write
from deepseek_tf.config.base import _Section, knob, nested
from deepseek_tf.config.data import DATA_STAGES, DataConfig, TokenizerConfig
from deepseek_tf.config.model import ROPE_FLAGS, ModelConfig, RopeScaling
from deepseek_tf.config.train import (DistillConfig, DPOConfig, FreezeConfig, GRPOConfig,
                                      LoraConfig, OptimConfig, TrainConfig)
from deepseek_tf.errors import ConfigError, UserError

__all__ = ["CONFIG_VERSION", "DATA_STAGES", "DPOConfig", "DistillConfig", "DataConfig", "Experiment",
           "FreezeConfig", "GRPOConfig", "LoraConfig", "ModelConfig", "OptimConfig", "ROPE_FLAGS",
           "RopeScaling", "SECTIONS", "TokenizerConfig", "TrainConfig", "iter_fields",
           "knob", "nested"]

CONFIG_VERSION = 1


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig,
    "optim": OptimConfig, "train": TrainConfig, "lora": LoraConfig, "freeze": FreezeConfig,
    "dpo": DPOConfig, "grpo": GRPOConfig, "distill": DistillConfig}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, saved as `<workdir>/config.json`.

    Example:
        >>> exp = Experiment()
        >>> Experiment.from_dict(exp.to_dict()) == exp
        True
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    freeze: FreezeConfig = dataclasses.field(default_factory=FreezeConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"--data.seq_len={self.data.seq_len} exceeds "
                f"--model.max_position_embeddings={self.model.max_position_embeddings}.")
        if self.train.finetuning_type == "lora" and self.lora.dropout > 0 and \
                self.train.remat != "none":
            raise ConfigError(
                "--lora.dropout > 0 draws its masks from a stateful seed, which recomputation "
                "(--train.remat) would advance again: use --lora.dropout=0 or "
                "--train.remat=none.")
        if self.train.dsa_stage == "dense_warmup" and not (
                self.model.has_indexer and self.train.finetuning_type == "full"
                and self.train.stage not in ("dpo", "kto", "grpo", "distill")):
            raise ConfigError(
                "--train.dsa_stage=dense_warmup trains the lightning indexers and freezes the "
                "rest itself: it needs a model with indexers (--model.use_dsa, or "
                "--model.attention_type=v4 with compressed_sparse_attention layers), "
                "--train.finetuning_type=full and a next-token --train.stage (not dpo, kto, "
                "grpo or distill).")
        if (self.train.stage == "distill") != bool(self.distill.teacher):
            raise ConfigError(
                "--train.stage=distill needs --distill.teacher=WORKDIR (the frozen teacher)"
                if self.distill.teacher == "" else
                f"--distill.teacher={self.distill.teacher} needs --train.stage=distill.")
        if self.train.jit_compile == "true" and self.model.n_routed_experts and \
                self.model.capacity_factor <= 0 and self.train.stage not in ("dpo", "kto", "grpo"):
            raise ConfigError(
                "dropless MoE (--model.capacity_factor <= 0) has data-dependent buffer "
                "shapes that XLA cannot compile: set --model.capacity_factor > 0 (e.g. 1.25) "
                "or --train.jit_compile=false.")

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.steps

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name).to_dict() for name in SECTIONS}
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Experiment":
        d = _migrate(dict(d))
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported "
                              f"(this deepseek_tf reads version {CONFIG_VERSION}).")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; "
                              f"expected {', '.join(SECTIONS)}.")
        return cls(**{name: sec.from_dict(d.get(name, {})) for name, sec in SECTIONS.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename)."""
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "Experiment":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read config {path}: {e}. Fix or remove the file.") from e
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from e


def _migrate(d: dict) -> dict:
    """Reads configs saved before the tokenizer section existed (same version 1)."""
    data = dict(d.get("data", {}))
    if "tokenizer" in data:
        d.setdefault("tokenizer", {"type": data.pop("tokenizer")})
    if "max_documents" in data:
        data["max_samples"] = data.pop("max_documents")
    if "data" in d:
        d["data"] = data
    return d


def iter_fields():
    """Yields (section_name, dataclass_field, python_type) for every knob; the field of a
    nested section's knob is a copy named by its flat flag (e.g. rope_scaling_type)."""
    for name, sec in SECTIONS.items():
        for key, f, t in sec.flag_fields():
            if key != f.name:
                f = copy.copy(f)
                f.name = key
            yield name, f, t
