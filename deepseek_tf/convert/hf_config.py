"""Hugging Face `config.json` <-> `ModelConfig`, per architecture.

Supported: DeepseekV4ForCausalLM (`hf_v4.py`), DeepseekV32ForCausalLM (V3 + DeepSeek Sparse Attention),
DeepseekV3ForCausalLM, DeepseekV2ForCausalLM, LlamaForCausalLM and Qwen2ForCausalLM (transformers 4.x `rope_theta` / `rope_scaling` and 5.x
`rope_parameters` styles). Settings that transformers' own implementation ignores
are mapped to what it computes (e.g. DeepSeek-V2's router never normalises its
top-k weights, and both DeepSeek classes make every layer from
`first_k_dense_replace` on an MoE layer, whatever `moe_layer_freq` says).
Anything we cannot represent exactly is refused with one line naming the field.

Example:
    >>> cfg, notes = model_config_from_hf(json.load(open("hf/config.json")))
"""

from __future__ import annotations

from typing import Any

from deepseek_tf.config import ModelConfig
from deepseek_tf.convert.hf_checks import check_hf_config
from deepseek_tf.convert.hf_v4 import check_exportable, v4_fields_from_hf, v4_hf_config
from deepseek_tf.errors import UserError

ARCHITECTURES = ("DeepseekV4ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "LlamaForCausalLM",
                 "Qwen2ForCausalLM")
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_ACTS_BACK = {"silu": "silu", "gelu": "gelu_pytorch_tanh"}


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {arch or '(none in config.json)'}; "
                        f"supported: {', '.join(ARCHITECTURES)}.")
    return arch


def _get(hf: dict, key: str, default: Any = None) -> Any:
    v = hf.get(key)
    return default if v is None else v


def _rope(hf: dict) -> dict:
    """Flattened RoPE fields from rope_parameters (v5) or rope_theta + rope_scaling (v4)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:  # per-layer-type rope parameters
        params = dict(params["full_attention"])
    params.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in params})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("yarn", "llama3"):
        raise UserError(f"config.json: rope type {kind!r} is not supported "
                        f"(default, yarn and llama3 are).")
    if params.get("truncate") is False:
        raise UserError("config.json: rope_parameters.truncate=false is not supported.")
    orig = params.get("original_max_position_embeddings") or hf.get(
        "original_max_position_embeddings") or hf["max_position_embeddings"]
    factor = params.get("factor") or hf["max_position_embeddings"] / orig
    out.update(rope_scaling_type=kind, rope_scaling_factor=float(factor),
               original_max_position_embeddings=int(orig))
    if kind == "yarn":
        out.update(beta_fast=float(params.get("beta_fast") or 32.0),
                   beta_slow=float(params.get("beta_slow") or 1.0),
                   mscale=float(params.get("mscale") or 0.0),
                   mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                   rope_attention_factor=float(params.get("attention_factor") or 0.0))
    else:
        out.update(low_freq_factor=float(params["low_freq_factor"]),
                   high_freq_factor=float(params["high_freq_factor"]))
    return out


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, list[str]]:
    """(ModelConfig, notes) for an HF config dict; notes explain choices made.

    Every missing or unsupported field is one UserError (`hf_checks.check_hf_config`).
    """
    arch = architecture_of(hf)
    check_hf_config(hf, arch)
    act = _get(hf, "hidden_act", "silu")
    heads = hf["num_attention_heads"]
    v4 = arch == "DeepseekV4ForCausalLM"
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["moe_intermediate_size" if v4 else "intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, hidden_act=_ACTS[act],
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(_get(hf, "initializer_range", 0.02)))
    if v4:
        fields, notes = v4_fields_from_hf(hf, _rope)
        return ModelConfig(**kw, **fields), notes
    kw.update(_rope(hf))
    notes: list[str] = []
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        head_dim = _get(hf, "head_dim", hf["hidden_size"] // heads)
        kw.update(attention_type="gqa", num_key_value_heads=_get(hf, "num_key_value_heads", heads),
                  head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim)
        if arch == "Qwen2ForCausalLM":
            kw["attention_bias"] = True
        return ModelConfig(**kw), notes
    kw.update(attention_type="mla", q_lora_rank=_get(hf, "q_lora_rank", 0),
              kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
              qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
              attention_bias=bool(hf.get("attention_bias", False)))
    experts = _get(hf, "n_routed_experts", 0)
    if experts:
        kw.update(n_routed_experts=experts, n_shared_experts=_get(hf, "n_shared_experts", 0),
                  num_experts_per_tok=hf["num_experts_per_tok"],
                  moe_intermediate_size=hf["moe_intermediate_size"],
                  n_group=_get(hf, "n_group", 1), topk_group=_get(hf, "topk_group", 1),
                  routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
                  first_k_dense_replace=_get(hf, "first_k_dense_replace", 0), moe_layer_freq=1)
        if hf.get("moe_layer_freq", 1) != 1:
            notes.append("moe_layer_freq ignored: transformers makes every layer from "
                         "first_k_dense_replace on an MoE layer")
    if arch == "DeepseekV32ForCausalLM":  # MLA RoPE always on interleaved pairs
        kw.update(rope_interleave=True, use_dsa=True, index_topk=_get(hf, "index_topk", 2048),
                  index_head_dim=_get(hf, "index_head_dim", 128),
                  index_n_heads=_get(hf, "index_n_heads", 64))
    if arch.startswith("DeepseekV3"):
        if arch == "DeepseekV3ForCausalLM":
            kw.update(rope_interleave=bool(hf.get("rope_interleave", True)))
        if experts:
            kw.update(scoring_func="sigmoid", topk_method="noaux_tc",
                      norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
    else:  # DeepSeek-V2: complex-number RoPE on interleaved pairs, softmax router
        kw.update(rope_interleave=True)
        if experts:
            method = _get(hf, "topk_method", "greedy")
            kw.update(scoring_func="softmax", topk_method=method, norm_topk_prob=False)
            if hf.get("norm_topk_prob"):
                notes.append("norm_topk_prob ignored: transformers' DeepSeek-V2 router "
                             "never normalises")
    return ModelConfig(**kw), notes


def _rope_parameters(cfg: ModelConfig) -> dict:
    p: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.resolved_rope_scaling
    if s:
        p.update(rope_type=s.type, factor=s.factor,
                 original_max_position_embeddings=s.original_max_position_embeddings)
        if s.type == "yarn":
            p.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale,
                     mscale_all_dim=s.mscale_all_dim)
            if s.attention_factor:
                p["attention_factor"] = s.attention_factor
        else:
            p.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    return p


def export_architecture(cfg: ModelConfig) -> str:
    """The HF class that represents `cfg` exactly; UserError if none does."""
    if cfg.attention_type == "hybrid":
        raise UserError("hybrid attention has no Hugging Face equivalent; export it with "
                        "another format.")
    if cfg.attention_type == "v4":
        check_exportable(cfg)
        return "DeepseekV4ForCausalLM"
    if cfg.hc_mult or cfg.mlp_layer_types or cfg.swiglu_limit:
        raise UserError("hyper-connections, mlp_layer_types and swiglu_limit export only "
                        "with --model.attention_type=v4 (DeepseekV4ForCausalLM).")
    moe = cfg.n_routed_experts > 0
    if cfg.use_dsa:
        _check_v32(cfg, moe)
        return "DeepseekV32ForCausalLM"
    if not cfg.uses_mla:
        if moe:
            raise UserError("grouped-query attention with MoE has no supported Hugging Face "
                            "class (use attention_type=mla for DeepSeek).")
        return "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"
    if moe and cfg.num_hidden_layers > cfg.first_k_dense_replace and cfg.moe_layer_freq != 1:
        raise UserError(f"--model.moe_layer_freq={cfg.moe_layer_freq}: transformers' DeepSeek "
                        f"classes make every layer from first_k_dense_replace on MoE.")
    if not moe or cfg.scoring_func == "sigmoid":
        if moe and cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
            raise UserError("sigmoid scoring with group_limited_greedy (max-score groups) has "
                            "no Hugging Face equivalent.")
        if moe and cfg.topk_method == "greedy" and cfg.topk_group < cfg.n_group:
            raise UserError("greedy routing with n_group > topk_group has no Hugging Face "
                            "equivalent.")
        return "DeepseekV3ForCausalLM"
    if cfg.topk_method == "noaux_tc" or cfg.norm_topk_prob:
        raise UserError("softmax routing exports as DeepseekV2, whose router supports only "
                        "greedy / group_limited_greedy without norm_topk_prob.")
    if not cfg.rope_interleave:
        raise UserError("DeepseekV2 applies RoPE to interleaved pairs: export needs "
                        "--model.rope_interleave=true.")
    return "DeepseekV2ForCausalLM"


def _check_v32(cfg: ModelConfig, moe: bool) -> None:
    """What DeepseekV32ForCausalLM hard-codes: interleaved RoPE and V3's router."""
    if not cfg.rope_interleave:
        raise UserError("DeepseekV32 applies MLA RoPE to interleaved pairs: export needs "
                        "--model.rope_interleave=true.")
    if cfg.attention_bias:
        raise UserError("--model.attention_bias with DSA has no Hugging Face equivalent.")
    if moe and (cfg.scoring_func != "sigmoid" or cfg.topk_method == "group_limited_greedy"
                or (cfg.topk_method == "greedy" and cfg.topk_group < cfg.n_group)):
        raise UserError("DeepseekV32's router is V3's (sigmoid, noaux_tc): export needs "
                        "--model.scoring_func=sigmoid --model.topk_method=noaux_tc.")
    if moe and cfg.num_hidden_layers > cfg.first_k_dense_replace and cfg.moe_layer_freq != 1:
        raise UserError(f"--model.moe_layer_freq={cfg.moe_layer_freq}: transformers' DeepSeek "
                        f"classes make every layer from first_k_dense_replace on MoE.")


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """The config.json dict for `export_architecture(cfg)`."""
    arch = export_architecture(cfg)
    d: dict[str, Any] = dict(
        architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, hidden_act=_ACTS_BACK[cfg.hidden_act],
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        rope_parameters=_rope_parameters(cfg), rope_theta=cfg.rope_theta,
        attention_dropout=0.0, use_cache=True, dtype="float32")
    if arch == "DeepseekV4ForCausalLM":
        d.pop("intermediate_size")
        return {**d, **v4_hf_config(cfg, _rope_parameters(cfg))}
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        d.update(model_type="llama" if arch == "LlamaForCausalLM" else "qwen2",
                 num_key_value_heads=cfg.resolved_kv_heads, head_dim=cfg.resolved_head_dim)
        if arch == "LlamaForCausalLM":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False)
        return d
    moe = cfg.n_routed_experts > 0
    d.update(model_type={"DeepseekV32ForCausalLM": "deepseek_v32",
                         "DeepseekV3ForCausalLM": "deepseek_v3"}.get(arch, "deepseek_v2"),
             num_key_value_heads=cfg.num_attention_heads,
             q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
             qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
             v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
             n_routed_experts=cfg.n_routed_experts if moe else 1,
             n_shared_experts=cfg.n_shared_experts if moe else 0,
             num_experts_per_tok=cfg.num_experts_per_tok if moe else 1,
             moe_intermediate_size=cfg.moe_intermediate_size,
             n_group=cfg.n_group if moe else 1, topk_group=cfg.topk_group if moe else 1,
             routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
             first_k_dense_replace=(cfg.first_k_dense_replace if moe else cfg.num_hidden_layers))
    if arch.startswith("DeepseekV3"):
        d.update(rope_interleave=cfg.rope_interleave, scoring_func="sigmoid",
                 topk_method="noaux_tc", num_nextn_predict_layers=cfg.num_nextn_predict_layers)
    if arch == "DeepseekV32ForCausalLM":
        d.update(index_topk=cfg.index_topk, index_head_dim=cfg.index_head_dim,
                 index_n_heads=cfg.index_n_heads)
    else:
        d.update(topk_method=cfg.topk_method, scoring_func="softmax", mlp_bias=False)
    return d
