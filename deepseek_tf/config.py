"""Experiment configuration: small frozen dataclasses, one per concern.

This module is the single source of truth for every knob of the framework. It
imports nothing from the rest of the package. Each dataclass validates itself on
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

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the cause and the fix."""


class UserError(RuntimeError):
    """Bad user input outside the config (files, data, checkpoints): one clear line."""


def knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         resumable: bool = False) -> Any:
    """A dataclass field with the metadata that flags and validation use.

    Args:
      default: the default value (its type must match the annotation).
      help: one-sentence help text, shown by `--help`.
      choices: allowed values for a string field.
      resumable: True if the value may change when a run resumes in a workdir
        whose saved config says otherwise (e.g. the total number of steps).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "resumable": resumable})


_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if t not in (int, float, bool, str):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {t!r}")
    return t


class _Section:
    """Mixin for config dataclasses: type checking, dict round trip, validation."""

    SECTION = ""

    def _coerce_and_check_types(self) -> None:
        for f in dataclasses.fields(self):
            t = _field_type(type(self), f)
            v = getattr(self, f.name)
            where = f"{self.SECTION}.{f.name}"
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                continue
            if t is int and isinstance(v, bool) or not isinstance(v, t):
                raise ConfigError(
                    f"--{where}={v!r} has the wrong type: expected {t.__name__}.")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(
                    f"--{where}={v!r} is not one of {', '.join(choices)}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.SECTION} config key(s) {', '.join(unknown)}; "
                f"valid keys are listed by --help.")
        return cls(**dict(d))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def _require(self, ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Architecture of the decoder (HF `LlamaConfig` / `DeepseekV3Config` names).

    Args: see each field's help text (`python -m deepseek_tf.train --help`).

    Example:
        >>> ModelConfig(hidden_size=64, num_attention_heads=4).resolved_kv_heads
        4
    """

    SECTION = "model"

    vocab_size: int = knob(320, "Vocabulary size of the embedding and output head; "
                           "must be >= the tokenizer's vocabulary.")
    hidden_size: int = knob(256, "Width of the residual stream.")
    intermediate_size: int = knob(704, "Hidden width of the SwiGLU MLP.")
    num_hidden_layers: int = knob(4, "Number of decoder blocks.")
    num_attention_heads: int = knob(8, "Number of query heads.")
    num_key_value_heads: int = knob(0, "Number of key/value heads for grouped-query "
                                    "attention; 0 means num_attention_heads (MHA).")
    head_dim: int = knob(0, "Per-head width; 0 means hidden_size // num_attention_heads.")
    hidden_act: str = knob("silu", "Activation of the gated MLP.", choices=("silu", "gelu"))
    rms_norm_eps: float = knob(1e-6, "Epsilon of RMSNorm.")
    rope_theta: float = knob(10000.0, "Base of the rotary position embedding.")
    max_position_embeddings: int = knob(2048, "Longest sequence the model is built for.")
    tie_word_embeddings: bool = knob(False, "Share the embedding matrix with the output head.")
    initializer_range: float = knob(0.02, "Stddev of the normal weight initializer.")
    attention_bias: bool = knob(False, "Use biases on the q/k/v projections (Qwen2 style).")
    attention_type: str = knob("gqa", "Attention kind: gqa (dense Llama/Qwen2-style "
                               "grouped-query attention).", choices=("gqa",))

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            r(getattr(self, name) > 0, f"--model.{name} must be > 0, got {getattr(self, name)}.")
        r(self.num_key_value_heads >= 0, "--model.num_key_value_heads must be >= 0 (0 = MHA).")
        r(self.head_dim >= 0, "--model.head_dim must be >= 0 (0 = hidden_size // heads).")
        if self.head_dim == 0:
            r(self.hidden_size % self.num_attention_heads == 0,
              f"--model.num_attention_heads={self.num_attention_heads} must divide "
              f"--model.hidden_size={self.hidden_size} (or set --model.head_dim).")
        r(self.num_attention_heads % self.resolved_kv_heads == 0,
          f"--model.num_key_value_heads={self.num_key_value_heads} must divide "
          f"--model.num_attention_heads={self.num_attention_heads}.")
        r(self.resolved_head_dim % 2 == 0,
          f"head dim {self.resolved_head_dim} must be even for rotary embeddings.")
        r(self.rms_norm_eps > 0, "--model.rms_norm_eps must be > 0.")
        r(self.rope_theta > 0, "--model.rope_theta must be > 0.")
        r(self.initializer_range > 0, "--model.initializer_range must be > 0.")

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where the training data comes from and how it is cut into batches.

    Example:
        >>> DataConfig(seq_len=128).seq_len
        128
    """

    SECTION = "data"

    corpus: str = knob("stdlib", "Corpus to prepare when data_dir does not exist yet: "
                       "stdlib = the Python standard library's own .py sources, found "
                       "on this machine (no download).", choices=("stdlib",))
    data_dir: str = knob("", "Directory of prepared TFRecord shards + metadata.json "
                         "(prepare writes it, train reads it); empty means <workdir>/data.")
    tokenizer: str = knob("byte", "Tokenizer: byte = 256 byte ids + BOS/EOS/PAD.",
                          choices=("byte",))
    seq_len: int = knob(256, "Tokens per packed training window.")
    val_size: float = knob(0.05, "Validation split: a fraction of documents (< 1) or a "
                           "document count (>= 1); the split is by file, deterministic.")
    max_documents: int = knob(0, "Use at most this many documents (0 = all).")
    shard_size_mb: float = knob(4.0, "Target size of one TFRecord shard in MB.")
    shuffle_buffer: int = knob(1024, "Windows in the seeded shuffle buffer (0 = no shuffle).")
    cycle_length: int = knob(4, "Shards read in parallel by the interleave.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.seq_len >= 2, f"--data.seq_len must be >= 2, got {self.seq_len}.")
        r(self.val_size >= 0, f"--data.val_size must be >= 0, got {self.val_size}.")
        r(self.val_size < 1 or float(self.val_size).is_integer(),
          f"--data.val_size={self.val_size}: use a fraction below 1 or a whole count.")
        r(self.max_documents >= 0, "--data.max_documents must be >= 0 (0 = all).")
        r(self.shard_size_mb > 0, "--data.shard_size_mb must be > 0.")
        r(self.shuffle_buffer >= 0, "--data.shuffle_buffer must be >= 0.")
        r(self.cycle_length >= 1, "--data.cycle_length must be >= 1.")


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW with linear warmup and cosine decay.

    Example:
        >>> OptimConfig(learning_rate=1e-3, warmup_steps=10).warmup_steps
        10
    """

    SECTION = "optim"

    learning_rate: float = knob(1e-3, "Peak learning rate, reached after warmup.")
    min_lr_ratio: float = knob(0.1, "Final learning rate as a fraction of the peak.")
    warmup_steps: int = knob(100, "Linear warmup steps from 0 to the peak.")
    decay_steps: int = knob(0, "Total schedule length in steps (warmup included); "
                            "0 means train.steps.")
    weight_decay: float = knob(0.1, "Decoupled weight decay (not applied to norms, "
                               "biases and embeddings).")
    beta_1: float = knob(0.9, "Adam beta_1.")
    beta_2: float = knob(0.95, "Adam beta_2.")
    epsilon: float = knob(1e-8, "Adam epsilon.")
    clip_norm: float = knob(1.0, "Clip gradients to this global norm (0 = no clipping).")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.learning_rate > 0, f"--optim.learning_rate must be > 0, got {self.learning_rate}.")
        r(0 <= self.min_lr_ratio <= 1, "--optim.min_lr_ratio must be in [0, 1].")
        r(self.warmup_steps >= 0, "--optim.warmup_steps must be >= 0.")
        r(self.decay_steps >= 0, "--optim.decay_steps must be >= 0 (0 = train.steps).")
        r(self.weight_decay >= 0, "--optim.weight_decay must be >= 0.")
        r(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1, "Adam betas must be in [0, 1).")
        r(self.epsilon > 0, "--optim.epsilon must be > 0.")
        r(self.clip_norm >= 0, "--optim.clip_norm must be >= 0 (0 = off).")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """The training loop: steps, batch, intervals, checkpoints.

    Example:
        >>> TrainConfig(steps=10, batch_size=2).global_batch(replicas=2)
        4
    """

    SECTION = "train"

    steps: int = knob(1000, "Total optimizer steps; may be raised to continue a run.",
                      resumable=True)
    batch_size: int = knob(16, "Sequences per replica per micro-batch.")
    grad_accum_steps: int = knob(1, "Micro-batches accumulated per optimizer step.")
    seed: int = knob(0, "Seed for initialization and data order.")
    log_every: int = knob(10, "Log train metrics every N steps.", resumable=True)
    eval_every: int = knob(200, "Evaluate on the validation split every N steps "
                           "(0 = only at the end).", resumable=True)
    eval_steps: int = knob(20, "Validation batches per evaluation.", resumable=True)
    checkpoint_every: int = knob(200, "Save a checkpoint every N steps (and at the end).",
                                 resumable=True)
    keep_checkpoints: int = knob(3, "Checkpoints to keep.", resumable=True)
    jit_compile: bool = knob(False, "Compile the train step with XLA.", resumable=True)
    deterministic: bool = knob(True, "Enable TF op determinism (bitwise reproducible "
                               "runs and resumes on CPU).", resumable=True)

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every",
                     "checkpoint_every", "keep_checkpoints", "eval_steps"):
            r(getattr(self, name) > 0, f"--train.{name} must be > 0, got {getattr(self, name)}.")
        r(self.eval_every >= 0, "--train.eval_every must be >= 0 (0 = only at the end).")
        r(self.seed >= 0, "--train.seed must be >= 0.")

    def global_batch(self, replicas: int = 1) -> int:
        """Sequences per optimizer step across all replicas."""
        return self.batch_size * replicas * self.grad_accum_steps


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


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
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"--data.seq_len={self.data.seq_len} exceeds "
                f"--model.max_position_embeddings={self.model.max_position_embeddings}.")

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.steps

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name).to_dict() for name in SECTIONS}
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Experiment":
        d = dict(d)
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
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

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


def iter_fields():
    """Yields (section_name, dataclass_field, python_type) for every knob."""
    for name, sec in SECTIONS.items():
        for f in dataclasses.fields(sec):
            yield name, f, _field_type(sec, f)
