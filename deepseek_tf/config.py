"""Experiment configuration: small frozen dataclasses, one per concern.

This module is the single source of truth for every knob of the framework. It
imports nothing from the rest of the package but `atomic` (file writes) and
`errors`. Each dataclass validates itself on construction and raises `ConfigError`
(a one-line, user-facing message) for a bad value, so that a wrong flag is reported
before any graph is built.

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
import inspect
import json
import re
import typing
from typing import Any, Mapping, Optional

from deepseek_tf.atomic import atomic_write
from deepseek_tf.errors import ConfigError, UserError

CONFIG_VERSION = 1


def knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         resumable: bool = False, stage: str | None = None, flag: str | None = None) -> Any:
    """A dataclass field with the metadata that flags and validation use.

    Args:
      default: the default value (its type must match the annotation).
      help: one-sentence help text, shown by `--help`.
      choices: allowed values for a string field.
      resumable: True if the value may change when a run resumes in a workdir
        whose saved config says otherwise (e.g. the total number of steps).
      stage: `DataConfig` only: when the field acts (see `DATA_STAGES`).
      flag: a field of a nested dataclass (`RopeScaling`): its flat flag and
        config.json key in the enclosing section, when it differs from the field name.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "resumable": resumable, "stage": stage,
        "flag": flag})


def nested(cls: type, help: str) -> Any:
    """A field holding a nested section dataclass (e.g. `ModelConfig.rope_scaling`),
    whose knobs keep flat flags and config.json keys (their `flag` metadata)."""
    return dataclasses.field(default_factory=cls, metadata={
        "help": help, "choices": None, "resumable": False, "stage": None, "flag": None,
        "nested": cls})


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


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
            v = getattr(self, f.name)
            sub = f.metadata.get("nested")
            if sub:
                if isinstance(v, Mapping):
                    object.__setattr__(self, f.name, sub.from_dict(v))
                elif not isinstance(v, sub):
                    raise ConfigError(f"{self.SECTION}.{f.name}={v!r} has the wrong type: "
                                      f"expected {sub.__name__}.")
                continue
            t = _field_type(type(self), f)
            where = f"{self.SECTION}.{f.metadata.get('flag') or f.name}"
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

    @classmethod
    def flag_fields(cls) -> list[tuple[str, dataclasses.Field, type]]:
        """(key, field, type) of every knob; a nested section's knobs (e.g.
        `ModelConfig.rope_scaling`) come under their flat flag names. The keys are
        the flags (`--<section>.<key>`) and the keys of `to_dict` / `from_dict`."""
        out = []
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("nested")
            if sub:
                out += [(g.metadata["flag"] or g.name, g, _field_type(sub, g))
                        for g in dataclasses.fields(sub)]
            else:
                out.append((f.name, f, _field_type(cls, f)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Flat: a nested section's knobs under their flag names (see `flag_fields`)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("nested"):
                d.update({g.metadata["flag"] or g.name: getattr(v, g.name)
                          for g in dataclasses.fields(v)})
            else:
                d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {name for name, _, _ in cls.flag_fields()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.SECTION} config key(s) {', '.join(unknown)}; "
                f"valid keys are listed by --help.")
        return cls(**dict(d))

    def replace(self, **changes):
        """A copy with `changes`: field names, or a nested section's flat keys (e.g.
        `ModelConfig.replace(rope_scaling_factor=4.0)`)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)(**{**kw, **changes})

    def _require(self, ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling(_Section):
    """RoPE scaling (HF `rope_scaling` / `rope_parameters`): none, YaRN or llama3.

    `ModelConfig.rope_scaling` holds one; its knobs keep their flat flags and
    config.json keys (`--model.rope_scaling_type`, `--model.beta_fast`, ...: the
    `flag` metadata). The field names are HF's, so `to_dict()` is the dict HF and the
    layers' `get_config` use.

    Example:
        >>> RopeScaling(type="yarn", factor=4.0).beta_fast
        32.0
    """

    SECTION = "model"

    type: str = knob("none", "RoPE scaling: none, yarn (DeepSeek-V2/V3 long context) or "
                     "llama3 (Llama 3.1 / R1-Distill-Llama).",
                     choices=("none", "yarn", "llama3"), flag="rope_scaling_type")
    factor: float = knob(1.0, "RoPE scaling: context extension factor.",
                         flag="rope_scaling_factor")
    original_max_position_embeddings: int = knob(0, "RoPE scaling: the pre-extension "
                                                 "context length; 0 means "
                                                 "max_position_embeddings.")
    beta_fast: float = knob(32.0, "YaRN: rotations above which dims extrapolate.")
    beta_slow: float = knob(1.0, "YaRN: rotations below which dims interpolate.")
    mscale: float = knob(1.0, "YaRN: mscale of the cos/sin attention factor.")
    mscale_all_dim: float = knob(0.0, "YaRN: mscale_all_dim; > 0 also multiplies the MLA "
                                 "softmax scale by (0.1 * mscale_all_dim * ln(factor) + 1)^2.")
    attention_factor: float = knob(0.0, "YaRN: explicit cos/sin attention factor; 0 derives "
                                   "it from factor, mscale, mscale_all_dim.",
                                   flag="rope_attention_factor")
    low_freq_factor: float = knob(1.0, "llama3 RoPE scaling: low_freq_factor.")
    high_freq_factor: float = knob(4.0, "llama3 RoPE scaling: high_freq_factor.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.original_max_position_embeddings >= 0,
          "--model.original_max_position_embeddings must be >= 0 (0 = max_position_embeddings).")
        if self.type != "none":
            r(self.factor >= 1.0, f"--model.rope_scaling_factor={self.factor} must be >= 1 "
                                  f"with --model.rope_scaling_type={self.type}.")
        if self.type == "yarn":
            r(self.beta_fast > self.beta_slow > 0,
              "--model.beta_fast must be > --model.beta_slow > 0 for YaRN.")
        if self.type == "llama3":
            r(self.high_freq_factor > self.low_freq_factor > 0,
              "--model.high_freq_factor must be > --model.low_freq_factor > 0 for llama3 RoPE.")

    @classmethod
    def coerce(cls, value: "RopeScaling | Mapping[str, Any] | None") -> Optional["RopeScaling"]:
        """A RopeScaling from itself or its `to_dict()` (a layer config); None if unscaled."""
        if not value:
            return None
        s = value if isinstance(value, cls) else cls.from_dict(value)
        return None if s.type == "none" else s


#: The flat flags / config.json keys of `RopeScaling`, in field order.
ROPE_FLAGS = tuple(f.metadata["flag"] or f.name for f in dataclasses.fields(RopeScaling))


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
    attention_bias: bool = knob(False, "Use biases on the q/k/v projections (Qwen2 style); "
                                "with MLA: on q_a_proj, kv_a_proj_with_mqa and o_proj "
                                "(DeepSeek-V2 style).")
    attention_type: str = knob("gqa", "Attention kind: gqa (dense Llama/Qwen2-style grouped-"
                               "query attention), mla (DeepSeek multi-head latent "
                               "attention) or hybrid (global + sliding-window local mix "
                               "on the hybrid_base projections).",
                               choices=("gqa", "mla", "hybrid"))
    # mla
    q_lora_rank: int = knob(0, "MLA: rank of the low-rank query path (q_a_proj -> norm -> "
                            "q_b_proj); 0 means a plain q_proj.")
    kv_lora_rank: int = knob(64, "MLA: width of the compressed KV latent.")
    qk_nope_head_dim: int = knob(32, "MLA: per-head query/key width without RoPE.")
    qk_rope_head_dim: int = knob(16, "MLA: per-head query width with RoPE (and of the "
                                 "key's shared RoPE part).")
    v_head_dim: int = knob(32, "MLA: per-head value width.")
    rope_interleave: bool = knob(False, "RoPE on interleaved pairs (x0, x1), (x2, x3), ... "
                                 "(DeepSeek's checkpoint layout) instead of rotate-half.")
    # hybrid
    hybrid_base: str = knob("mla", "hybrid: the projections the global and local "
                            "branches share.", choices=("mla", "gqa"))
    sliding_window: int = knob(128, "hybrid: the local branch attends to the last "
                               "sliding_window tokens (the query's included).")
    hybrid_global_weight: float = knob(0.7, "hybrid: weight of the global attention output.")
    hybrid_local_weight: float = knob(0.3, "hybrid: weight of the local attention output.")
    # rope scaling: one RopeScaling; flags and config.json keys stay flat (ROPE_FLAGS)
    rope_scaling: RopeScaling = nested(RopeScaling, "RoPE scaling (flags: RopeScaling's).")
    # ModelConfig(rope_scaling_type=..., beta_fast=..., ...) and replace() with the flat
    # keys (flags, config.json, HF conversion) set rope_scaling's knobs; not attributes.
    rope_scaling_type: dataclasses.InitVar[Optional[str]] = None
    rope_scaling_factor: dataclasses.InitVar[Optional[float]] = None
    original_max_position_embeddings: dataclasses.InitVar[Optional[int]] = None
    beta_fast: dataclasses.InitVar[Optional[float]] = None
    beta_slow: dataclasses.InitVar[Optional[float]] = None
    mscale: dataclasses.InitVar[Optional[float]] = None
    mscale_all_dim: dataclasses.InitVar[Optional[float]] = None
    rope_attention_factor: dataclasses.InitVar[Optional[float]] = None
    low_freq_factor: dataclasses.InitVar[Optional[float]] = None
    high_freq_factor: dataclasses.InitVar[Optional[float]] = None
    # moe
    n_routed_experts: int = knob(0, "DeepSeekMoE: routed experts per MoE layer; 0 = a dense "
                                 "model (every layer a SwiGLU MLP).")
    n_shared_experts: int = knob(0, "DeepSeekMoE: always-active shared experts (one MLP of "
                                 "width n_shared_experts * moe_intermediate_size).")
    num_experts_per_tok: int = knob(2, "DeepSeekMoE: routed experts per token (top-k).")
    moe_intermediate_size: int = knob(128, "DeepSeekMoE: hidden width of each expert.")
    scoring_func: str = knob("sigmoid", "Router affinity: sigmoid (V3) or softmax (V2).",
                             choices=("sigmoid", "softmax"))
    topk_method: str = knob("noaux_tc", "Expert selection: noaux_tc (V3: scores + "
                            "e_score_correction_bias, groups ranked by the sum of their top-2), "
                            "greedy (plain top-k) or group_limited_greedy (V2: groups ranked "
                            "by their max score).",
                            choices=("noaux_tc", "greedy", "group_limited_greedy"))
    n_group: int = knob(1, "DeepSeekMoE: expert groups for group-limited routing.")
    topk_group: int = knob(1, "DeepSeekMoE: groups a token may route to.")
    routed_scaling_factor: float = knob(1.0, "DeepSeekMoE: multiplier of the routed "
                                        "experts' combine weights.")
    norm_topk_prob: bool = knob(True, "DeepSeekMoE: normalise the top-k weights to sum 1.")
    first_k_dense_replace: int = knob(0, "DeepSeekMoE: the first k layers keep a dense MLP.")
    moe_layer_freq: int = knob(1, "DeepSeekMoE: layer i >= first_k_dense_replace is MoE "
                               "when i % moe_layer_freq == 0.")
    capacity_factor: float = knob(1.25, "MoE training: expert buffer capacity = factor * "
                                  "tokens * top_k / experts (overflow tokens are dropped and "
                                  "counted); <= 0 = dropless (exact; dynamic shapes, so not "
                                  "with --train.jit_compile).", resumable=True)
    inference_capacity_factor: float = knob(0.0, "MoE outside training (eval, export, "
                                            "generation): like capacity_factor; <= 0 = "
                                            "dropless.", resumable=True)
    aux_loss_alpha: float = knob(0.0, "Weight of the sequence-wise expert balance loss "
                                 "(DeepSeek-V3: 1e-4).", resumable=True)
    router_z_loss_coef: float = knob(0.0, "Weight of the router z-loss "
                                     "(mean logsumexp(router logits)^2).", resumable=True)
    bias_update_speed: float = knob(0.001, "Aux-loss-free balancing (noaux_tc): after each "
                                    "step e_score_correction_bias += speed * sign(mean load - "
                                    "expert load), from the global load; 0 = off.",
                                    resumable=True)
    # mtp
    num_nextn_predict_layers: int = knob(0, "Multi-token prediction depth D: module k "
                                         "predicts the token k+1 ahead (0 = off).")
    mtp_loss_weight: float = knob(0.3, "Weight lambda of the MTP loss (averaged over the D "
                                  "modules).", resumable=True)
    # dropout (training only; stateless with explicit seeds, so remat recomputes the same masks)
    attention_dropout: float = knob(0.0, "Dropout rate on the attention probabilities.")
    hidden_dropout: float = knob(0.0, "Dropout rate on each attention and MLP output "
                                 "before its residual add.")

    def __post_init__(self, *rope_flags):
        self._coerce_and_check_types()
        # Flat rope keys given (flags, config.json, HF conversion) override rope_scaling's.
        given = {f.name: v for f, v in zip(dataclasses.fields(RopeScaling), rope_flags)
                 if v is not None}
        if given:
            object.__setattr__(self, "rope_scaling", self.rope_scaling.replace(**given))
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
        for name in ("attention_dropout", "hidden_dropout"):
            r(0 <= getattr(self, name) < 1,
              f"--model.{name} must be in [0, 1), got {getattr(self, name)}.")
        self._check_mla()
        self._check_moe()
        r(self.num_nextn_predict_layers >= 0, "--model.num_nextn_predict_layers must be >= 0.")
        r(self.mtp_loss_weight >= 0, "--model.mtp_loss_weight must be >= 0.")

    def _check_mla(self) -> None:
        r = self._require
        r(self.q_lora_rank >= 0, "--model.q_lora_rank must be >= 0 (0 = plain q_proj).")
        if self.uses_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                r(getattr(self, name) > 0,
                  f"--model.{name} must be > 0 with MLA, got {getattr(self, name)}.")
            r(self.qk_rope_head_dim % 2 == 0,
              f"--model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs).")
        if self.attention_type == "hybrid":
            r(self.sliding_window > 0, "--model.sliding_window must be > 0 for hybrid attention.")
            r(self.hybrid_global_weight >= 0 and self.hybrid_local_weight >= 0,
              "--model.hybrid_global_weight and --model.hybrid_local_weight must be >= 0.")

    def _check_moe(self) -> None:
        r = self._require
        e = self.n_routed_experts
        r(e >= 0, "--model.n_routed_experts must be >= 0 (0 = dense).")
        r(self.first_k_dense_replace >= 0, "--model.first_k_dense_replace must be >= 0.")
        r(self.moe_layer_freq >= 1, "--model.moe_layer_freq must be >= 1.")
        r(self.bias_update_speed >= 0, "--model.bias_update_speed must be >= 0.")
        r(self.aux_loss_alpha >= 0 and self.router_z_loss_coef >= 0,
          "--model.aux_loss_alpha and --model.router_z_loss_coef must be >= 0.")
        if not e:
            return
        k, g, tg = self.num_experts_per_tok, self.n_group, self.topk_group
        r(self.n_shared_experts >= 0, "--model.n_shared_experts must be >= 0.")
        r(self.moe_intermediate_size > 0, "--model.moe_intermediate_size must be > 0.")
        r(0 < k <= e, f"--model.num_experts_per_tok={k} must be in 1..n_routed_experts={e}.")
        r(g >= 1 and e % g == 0,
          f"--model.n_group={g} must divide --model.n_routed_experts={e}.")
        r(1 <= tg <= g, f"--model.topk_group={tg} must be in 1..n_group={g}.")
        if self.topk_method != "greedy":
            r(k <= tg * (e // g),
              f"--model.num_experts_per_tok={k} exceeds the {tg * (e // g)} experts in "
              f"--model.topk_group={tg} groups of {e // g}.")
        if self.topk_method == "noaux_tc" and g > 1:
            r(e // g >= 2, f"noaux_tc ranks groups by their top-2 scores: each of the "
                           f"--model.n_group={g} groups needs >= 2 of the {e} experts.")
        r(self.routed_scaling_factor > 0, "--model.routed_scaling_factor must be > 0.")

    @property
    def uses_mla(self) -> bool:
        return self.attention_type == "mla" or (
            self.attention_type == "hybrid" and self.hybrid_base == "mla")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True if decoder block `layer_idx` has a DeepSeekMoE feed-forward layer."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def resolved_rope_scaling(self) -> RopeScaling | None:
        """`rope_scaling` with original_max_position_embeddings resolved (0 ->
        max_position_embeddings), as the layers use it; None when unscaled."""
        s = self.rope_scaling
        if s.type == "none":
            return None
        return s.replace(original_max_position_embeddings=(
            s.original_max_position_embeddings or self.max_position_embeddings))

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# ModelConfig.__post_init__ pairs its init-only rope keys with RopeScaling's fields.
if [n for n in inspect.signature(ModelConfig).parameters if n in ROPE_FLAGS] != \
        list(ROPE_FLAGS):
    raise TypeError("ModelConfig's init-only rope keys must follow RopeScaling's fields.")
# They are not attributes: reading one (`cfg.beta_fast`) is an AttributeError instead of
# the InitVar's None default; `cfg.rope_scaling.beta_fast` is the value.
for _name in ROPE_FLAGS:
    delattr(ModelConfig, _name)


#: When a `DataConfig` field acts (its `stage` metadata). "source": where the data comes
#: from and how prepare runs (the inputs are fingerprinted by content, not by these
#: values); "prepare": shapes the prepared shards; "sft": shapes SFT samples (format
#: alpaca / sharegpt); "pipeline": batching at train time, may differ between runs on
#: the same prepared directory.
DATA_STAGES = ("source", "prepare", "sft", "pipeline")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where the training data comes from, how prepare cleans it, how it is batched.

    Each field's `stage` metadata (`DATA_STAGES`) says when it acts: the values that
    shape prepared data (`prepared_settings()`: cleaning, SFT, split, shards) are
    recorded in the data's metadata.json; the pipeline fields (`pipeline_settings()`:
    seq_len, packing, augmentation, shuffling) may differ between runs on the same
    prepared directory.

    Example:
        >>> DataConfig(seq_len=128).seq_len
        128
        >>> DataConfig(inputs="corpus/,extra.jsonl").input_list
        ('corpus/', 'extra.jsonl')
    """

    SECTION = "data"

    # -- sources
    corpus: str = knob("stdlib", "Embedded corpus used when --data.inputs is empty: stdlib = "
                       "the Python standard library's own .py sources, found on this "
                       "machine (no download).", choices=("stdlib",), stage="source")
    inputs: str = knob("", "Comma-separated files or directories to prepare: .txt/.md/.py "
                       "(one document per file), .json/.jsonl, .csv, .parquet, or a Hugging "
                       "Face save_to_disk directory. Empty means --data.corpus.", stage="source")
    format: str = knob("text", "What the inputs hold: text (pretraining documents), alpaca "
                       "(instruction/input/output/system/history) or sharegpt "
                       "(conversations with roles).", choices=("text", "alpaca", "sharegpt"),
                       stage="prepare")
    text_field: str = knob("text", "Field holding a document's text in JSON/CSV/Parquet/"
                           "datasets records (format=text).", stage="prepare")
    text_extensions: str = knob(".txt,.md,.py", "Comma-separated extensions of plain files "
                                "read as one document each when walking a directory.",
                                stage="prepare")
    max_samples: int = knob(0, "Read at most this many input records/documents (0 = all).",
                            stage="prepare")
    num_proc: int = knob(1, "Worker processes for cleaning and tokenizing (order-preserving: "
                         "the output does not depend on it).", stage="source")
    on_error: str = knob("skip", "Malformed JSON lines, missing fields and undecodable bytes: "
                         "skip (count and list them as file:line in the report) or fail.",
                         choices=("skip", "fail"), stage="source")
    data_dir: str = knob("", "Directory of prepared TFRecord shards + metadata.json "
                         "(prepare writes it, train reads it; --data.output_dir is an alias); "
                         "empty means <workdir>/data.", stage="source")
    # -- cleaning (applied in this order; each step is counted in the report)
    normalize: str = knob("NFC", "Unicode normalization of every text (none = keep as is).",
                          choices=("none", "NFC", "NFKC"), stage="prepare")
    replace_regex: str = knob("", "Python regex whose matches are replaced by "
                              "--data.replacement (empty = off).", stage="prepare")
    replacement: str = knob("", "Replacement text for --data.replace_regex matches.",
                            stage="prepare")
    drop_regex: str = knob("", "Python regex: documents/samples with a match are dropped "
                           "(empty = off).", stage="prepare")
    min_chars: int = knob(1, "Drop documents shorter than this many characters (whitespace "
                          "ignored).", stage="prepare")
    max_chars: int = knob(0, "Drop documents longer than this many characters (0 = no limit).",
                          stage="prepare")
    dedup_exact: bool = knob(True, "Drop exact duplicates (same text after cleaning); the "
                             "first occurrence is kept.", stage="prepare")
    dedup_threshold: float = knob(0.0, "Drop near duplicates whose estimated Jaccard "
                                  "similarity (MinHash LSH over word n-grams) with an earlier "
                                  "document is >= this; 0 = off, 0.8 is a common choice.",
                                  stage="prepare")
    dedup_ngram: int = knob(5, "Words per shingle for near-duplicate detection.", stage="prepare")
    dedup_num_perm: int = knob(128, "MinHash permutations for near-duplicate detection.",
                               stage="prepare")
    # -- instruction data (format=alpaca / sharegpt)
    template: str = knob("deepseek3", "Chat template of SFT samples (see README).",
                         choices=("deepseek3", "deepseek-r1", "chatml", "plain"), stage="sft")
    train_on_prompt: bool = knob(False, "SFT: also train on prompt tokens (default: the loss "
                                 "covers assistant tokens only).", stage="sft")
    mask_history: bool = knob(False, "SFT: train only on the last assistant turn.", stage="sft")
    cutoff_len: int = knob(0, "SFT: longest sample in tokens; longer ones lose their oldest "
                           "turns, then their tail (0 = seq_len).", stage="sft")
    # -- split and shards
    val_size: float = knob(0.05, "Validation split: a fraction of documents (< 1) or a "
                           "document count (>= 1); deterministic, by document name.",
                           stage="prepare")
    shard_size_mb: float = knob(4.0, "Target size of one TFRecord shard in MB.", stage="prepare")
    # -- pipeline (may change between runs on the same prepared data)
    seq_len: int = knob(256, "Tokens per packed training window.", stage="pipeline")
    packing: str = knob("pack", "Long documents: pack = concatenate into windows (SFT samples "
                        "are packed whole, never split); window = one document per row, cut "
                        "into sliding windows overlapping by --data.stride tokens.",
                        choices=("pack", "window"), stage="pipeline")
    stride: int = knob(0, "Overlap in tokens between consecutive sliding windows "
                       "(packing=window); overlapping tokens are context, not targets.",
                       stage="pipeline")
    augment: str = knob("none", "Training-time input masking (pretraining augmentation): "
                        "token = random single tokens, span = random spans of --data.mask_span "
                        "tokens are replaced by the pad id in the inputs; targets unchanged.",
                        choices=("none", "token", "span"), stage="pipeline")
    mask_rate: float = knob(0.15, "Fraction of input tokens masked by --data.augment.",
                            stage="pipeline")
    mask_span: int = knob(3, "Span length of --data.augment=span.", stage="pipeline")
    shuffle_buffer: int = knob(1024, "Windows in the seeded shuffle buffer (0 = no shuffle).",
                               stage="pipeline")
    cycle_length: int = knob(4, "Shards read in parallel by the interleave.", stage="pipeline")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.seq_len >= 2, f"--data.seq_len must be >= 2, got {self.seq_len}.")
        r(self.val_size >= 0, f"--data.val_size must be >= 0, got {self.val_size}.")
        r(self.val_size < 1 or float(self.val_size).is_integer(),
          f"--data.val_size={self.val_size}: use a fraction below 1 or a whole count.")
        r(self.max_samples >= 0, "--data.max_samples must be >= 0 (0 = all).")
        r(self.num_proc >= 1, f"--data.num_proc must be >= 1, got {self.num_proc}.")
        r(self.shard_size_mb > 0, "--data.shard_size_mb must be > 0.")
        r(self.shuffle_buffer >= 0, "--data.shuffle_buffer must be >= 0.")
        r(self.cycle_length >= 1, "--data.cycle_length must be >= 1.")
        r(self.min_chars >= 0, "--data.min_chars must be >= 0.")
        r(self.max_chars >= 0, "--data.max_chars must be >= 0 (0 = no limit).")
        r(not self.max_chars or self.max_chars >= self.min_chars,
          f"--data.max_chars={self.max_chars} is below --data.min_chars={self.min_chars}.")
        r(0 <= self.dedup_threshold <= 1,
          f"--data.dedup_threshold must be in [0, 1] (0 = off), got {self.dedup_threshold}.")
        r(self.dedup_ngram >= 1, "--data.dedup_ngram must be >= 1.")
        r(8 <= self.dedup_num_perm <= 1024, "--data.dedup_num_perm must be in [8, 1024].")
        for name in ("replace_regex", "drop_regex"):
            pattern = getattr(self, name)
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"--data.{name}={pattern!r} is not a valid regex: {e}.") from e
        r(self.cutoff_len >= 0, "--data.cutoff_len must be >= 0 (0 = seq_len).")
        r(self.cutoff_len <= self.seq_len + 1,
          f"--data.cutoff_len={self.cutoff_len} does not fit one window of --data.seq_len="
          f"{self.seq_len} (+1 target); raise seq_len or lower cutoff_len.")
        r(self.stride >= 0 and self.stride < self.seq_len,
          f"--data.stride={self.stride} must be in [0, seq_len={self.seq_len}).")
        r(0 < self.mask_rate < 1, f"--data.mask_rate must be in (0, 1), got {self.mask_rate}.")
        r(self.mask_span >= 1, "--data.mask_span must be >= 1.")
        r(all(e.startswith(".") for e in _split_list(self.text_extensions)),
          f"--data.text_extensions={self.text_extensions!r}: use e.g. .txt,.md,.py")

    @classmethod
    def fields_of(cls, stage: str) -> tuple[str, ...]:
        """Names of the fields of one of `DATA_STAGES`, in declaration order."""
        if stage not in DATA_STAGES:
            raise ValueError(f"unknown data stage {stage!r}; expected one of {DATA_STAGES}.")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["stage"] == stage)

    def prepared_settings(self) -> dict[str, Any]:
        """The values that shape the prepared data (prepare fingerprints them in
        metadata.json): the "prepare" fields, plus the "sft" ones (cutoff_len resolved)
        for SFT formats."""
        d = {k: getattr(self, k) for k in self.fields_of("prepare")}
        if self.is_sft:
            d.update({k: getattr(self, k) for k in self.fields_of("sft")},
                     cutoff_len=self.resolved_cutoff_len)
        return d

    def pipeline_settings(self) -> dict[str, Any]:
        """The "pipeline" fields: how prepared data is batched for one run."""
        return {k: getattr(self, k) for k in self.fields_of("pipeline")}

    @property
    def input_list(self) -> tuple[str, ...]:
        """--data.inputs as a tuple of paths."""
        return _split_list(self.inputs)

    @property
    def is_sft(self) -> bool:
        return self.format in ("alpaca", "sharegpt")

    @property
    def resolved_cutoff_len(self) -> int:
        return self.cutoff_len or self.seq_len


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(_Section):
    """Which tokenizer prepare builds (or trains) and saves with the data.

    Example:
        >>> TokenizerConfig(type="sentencepiece", vocab_size=4000).vocab_size
        4000
    """

    SECTION = "tokenizer"

    type: str = knob("byte", "byte = 256 byte ids + BOS/EOS/PAD (no files); sentencepiece = "
                     "trained on the prepared corpus (runs in-graph via tensorflow-text); hf = "
                     "a Hugging Face tokenizer.json (--tokenizer.path), as DeepSeek "
                     "checkpoints ship.", choices=("byte", "sentencepiece", "hf"))
    vocab_size: int = knob(8000, "Vocabulary size to train (sentencepiece).")
    path: str = knob("", "hf: tokenizer.json or a directory holding it (and optionally "
                     "tokenizer_config.json); sentencepiece: an existing .model file to use "
                     "instead of training one.")
    model_type: str = knob("bpe", "SentencePiece algorithm.", choices=("bpe", "unigram"))
    sample_lines: int = knob(1_000_000, "SentencePiece trains on at most this many lines, "
                             "sampled from the corpus.")
    bos_token: str = knob("", "hf: the BOS token (default: tokenizer_config.json's).")
    eos_token: str = knob("", "hf: the EOS token (default: tokenizer_config.json's).")
    pad_token: str = knob("", "hf: the PAD token (default: tokenizer_config.json's, else EOS).")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.type != "hf" or bool(self.path),
          "--tokenizer.type=hf needs --tokenizer.path=DIR_OR_tokenizer.json.")
        r(self.type != "sentencepiece" or self.path or self.vocab_size >= 300,
          f"--tokenizer.vocab_size={self.vocab_size} is too small for a byte-fallback "
          f"SentencePiece model (256 byte pieces + specials); use >= 300.")
        r(self.sample_lines > 0, "--tokenizer.sample_lines must be > 0.")


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
    fused: bool = knob(True, "Apply AdamW (decay + moments + update) as one XLA-compiled "
                       "kernel per variable, faster than Keras' op-by-op update (1.75x "
                       "on CPU at 13M weights); false = Keras' update (same math).")

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
    jit_compile: str = knob("false", "Compile the train step with XLA: true, false, or auto "
                            "= time a few compiled and uncompiled forward+backward passes of "
                            "this model on this machine before training and keep the faster "
                            "(the choice is saved in config.json; a resumed run keeps it).",
                            choices=("auto", "true", "false"), resumable=True)
    deterministic: bool = knob(True, "Enable TF op determinism (bitwise reproducible "
                               "runs and resumes on CPU).", resumable=True)
    # scale-out and memory (train/strategy.py, train/precision.py, layers/remat.py)
    strategy: str = knob("auto", "Distribution strategy: auto = multi_worker if TF_CONFIG "
                         "is set, mirrored if several GPUs are visible, else default (one "
                         "device); mirrored = all local GPUs (or all logical CPUs); "
                         "multi_worker = MultiWorkerMirroredStrategy over TF_CONFIG's cluster.",
                         choices=("auto", "default", "mirrored", "multi_worker"),
                         resumable=True)
    collective_timeout: float = knob(600.0, "Seconds a worker waits for its peers in a "
                                     "collective (all-reduce) before failing, so a lone "
                                     "worker never hangs forever; 0 = wait forever.",
                                     resumable=True)
    gpu_memory_growth: bool = knob(True, "Let TensorFlow allocate GPU memory as needed "
                                   "instead of all of it at start (no effect on CPU).",
                                   resumable=True)
    precision: str = knob("float32", "Numerics: float32, or mixed_float16 / mixed_bfloat16 "
                          "(float32 weights, 16-bit compute; norms, softmax and losses stay "
                          "float32). mixed_float16 uses dynamic loss scaling and skips steps "
                          "whose gradients overflow on any replica. auto = mixed_bfloat16 "
                          "where bfloat16 matmuls are fast (CPUs with AMX or AVX512_BF16, "
                          "GPUs of compute capability >= 8.0), else float32; saved in "
                          "config.json, so a resumed run keeps it.",
                          choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    initial_loss_scale: float = knob(2.0 ** 15, "Initial dynamic loss scale of mixed_float16 "
                                     "(halved on overflow, doubled after 2000 good steps).")
    profile_steps: str = knob("", "Profile train steps A,B (1-based, inclusive; e.g. 5,8) "
                              "with the TF profiler into <workdir>/tensorboard (TensorBoard's "
                              "Profile tab); empty = off.", resumable=True)
    auto_decisions: str = knob("", "Written by the trainer: how the auto settings "
                               "(jit_compile, precision) were resolved, and why.",
                               resumable=True)
    remat: str = knob("none", "Gradient checkpointing: recompute activations in the backward "
                      "pass per decoder block (block), or only its MLP (mlp) or attention "
                      "(attention) sub-layer; none keeps all activations.",
                      choices=("none", "block", "mlp", "attention"), resumable=True)
    # recovery from non-finite / exploding steps (train/recovery.py)
    recovery_max_trials: int = knob(3, "On a step with a non-finite loss or gradients (or a "
                                    "loss above --train.loss_upper_bound), restore the last "
                                    "checkpoint, skip the batches since it and go on, at most "
                                    "this many times per run (0 = stop at once).",
                                    resumable=True)
    loss_upper_bound: float = knob(0.0, "A step whose loss exceeds this is treated like a "
                                   "non-finite one (0 = off).", resumable=True)
    # fine-tuning (train/finetune.py, train/dpo.py)
    init_from: str = knob("", "Start from the model weights of this workdir (any deepseek_tf "
                          "workdir, e.g. one made by convert); its model config is used and "
                          "contradicting --model.* flags are refused. Optimizer, data and loop "
                          "start fresh. Empty = random initialization.")
    finetuning_type: str = knob("full", "Which weights train: full (all), freeze (only "
                                "--freeze.*), lora (low-rank adapters on --lora.targets; the "
                                "base stays frozen).", choices=("full", "freeze", "lora"))
    stage: str = knob("sft", "Objective: sft (next-token loss on the loss mask; pretraining "
                      "data too) or dpo (preference pairs, --dpo.*).", choices=("sft", "dpo"))
    early_stopping_patience: int = knob(0, "Stop after this many evaluations without a new "
                                        "best validation loss (0 = off). The best checkpoint "
                                        "is kept in checkpoints/best/ either way.",
                                        resumable=True)

    def __post_init__(self):
        if isinstance(self.jit_compile, bool):  # configs and callers from before "auto"
            object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())
        self._coerce_and_check_types()
        r = self._require
        r(self.recovery_max_trials >= 0, "--train.recovery_max_trials must be >= 0 (0 = off).")
        r(self.loss_upper_bound >= 0, "--train.loss_upper_bound must be >= 0 (0 = off).")
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every",
                     "checkpoint_every", "keep_checkpoints", "eval_steps"):
            r(getattr(self, name) > 0, f"--train.{name} must be > 0, got {getattr(self, name)}.")
        r(self.eval_every >= 0, "--train.eval_every must be >= 0 (0 = only at the end).")
        r(self.seed >= 0, "--train.seed must be >= 0.")
        r(self.collective_timeout >= 0, "--train.collective_timeout must be >= 0 (0 = forever).")
        r(self.initial_loss_scale >= 1, "--train.initial_loss_scale must be >= 1.")
        r(self.early_stopping_patience >= 0,
          "--train.early_stopping_patience must be >= 0 (0 = off).")
        prof = [p.strip() for p in self.profile_steps.split(",")] if self.profile_steps else []
        r(not prof or (len(prof) == 2 and all(p.isdigit() for p in prof)
                       and 1 <= int(prof[0]) <= int(prof[1])),
          f"--train.profile_steps={self.profile_steps!r} must be two step numbers A,B with "
          f"1 <= A <= B (e.g. 5,8), or empty.")

    @property
    def xla(self) -> bool:
        """`jit_compile` as a bool; "auto" must be resolved first (train/autotune.py)."""
        if self.jit_compile == "auto":
            raise ValueError("--train.jit_compile=auto is not resolved yet "
                             "(deepseek_tf.train.autotune.resolve_jit_compile).")
        return self.jit_compile == "true"

    def global_batch(self, replicas: int = 1) -> int:
        """Sequences per optimizer step across all replicas."""
        return self.batch_size * replicas * self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class LoraConfig(_Section):
    """LoRA adapters (`--train.finetuning_type=lora`), through Keras' `Dense.enable_lora`.

    Example:
        >>> LoraConfig(rank=8, targets="q_proj,v_proj").target_list
        ('q_proj', 'v_proj')
    """

    SECTION = "lora"

    rank: int = knob(8, "Rank r of each adapter (A: in x r, B: r x out; B starts at zero).")
    alpha: float = knob(16.0, "Scale: the adapter adds (alpha / rank) * x A B.")
    dropout: float = knob(0.0, "Dropout on the adapter's input during training.")
    targets: str = knob("all", "Comma-separated projection names to adapt (q_proj, k_proj, "
                        "v_proj, o_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, "
                        "gate_proj, up_proj, down_proj; shared experts included), or all.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.rank > 0, f"--lora.rank must be > 0, got {self.rank}.")
        r(self.alpha > 0, f"--lora.alpha must be > 0, got {self.alpha}.")
        r(0 <= self.dropout < 1, f"--lora.dropout must be in [0, 1), got {self.dropout}.")
        r(bool(self.target_list), "--lora.targets is empty: name projections or use all.")

    @property
    def target_list(self) -> tuple[str, ...]:
        return _split_list(self.targets)


@dataclasses.dataclass(frozen=True)
class FreezeConfig(_Section):
    """Partial fine-tuning (`--train.finetuning_type=freeze`).

    Example:
        >>> FreezeConfig(trainable_layers=2, modules="lm_head").module_list
        ('lm_head',)
    """

    SECTION = "freeze"

    trainable_layers: int = knob(2, "Train the last N decoder blocks (0 = none).")
    modules: str = knob("", "Comma-separated module names also trained wherever they occur "
                        "(e.g. lm_head, norm, embed_tokens, mlp, self_attn, q_proj).")

    def __post_init__(self):
        self._coerce_and_check_types()
        self._require(self.trainable_layers >= 0, "--freeze.trainable_layers must be >= 0.")

    @property
    def module_list(self) -> tuple[str, ...]:
        return _split_list(self.modules)


@dataclasses.dataclass(frozen=True)
class DPOConfig(_Section):
    """Direct preference optimization (`--train.stage=dpo`).

    Example:
        >>> DPOConfig(beta=0.1, loss="ipo").loss
        'ipo'
    """

    SECTION = "dpo"

    beta: float = knob(0.1, "DPO temperature beta (IPO: the regularization 1/(2 tau)).")
    loss: str = knob("sigmoid", "sigmoid = -log sigmoid(beta * margin) (DPO); ipo = (margin - "
                     "1/(2 beta))^2 with length-averaged log-ratios.", choices=("sigmoid", "ipo"))
    label_smoothing: float = knob(0.0, "sigmoid: conservative DPO label smoothing in [0, 0.5).")
    reference: str = knob("model", "Reference log-probs: model = a frozen copy of the "
                          "init_from weights runs beside the policy at every step; "
                          "precomputed = computed once for every training pair before "
                          "training (faster steps; validation pairs are scored live).",
                          choices=("model", "precomputed"))

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.beta > 0, f"--dpo.beta must be > 0, got {self.beta}.")
        r(0 <= self.label_smoothing < 0.5, "--dpo.label_smoothing must be in [0, 0.5).")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig,
    "optim": OptimConfig, "train": TrainConfig, "lora": LoraConfig, "freeze": FreezeConfig,
    "dpo": DPOConfig}


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
        if self.train.jit_compile == "true" and self.model.n_routed_experts and \
                self.model.capacity_factor <= 0:
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

