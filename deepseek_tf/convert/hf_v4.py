"""DeepSeek-V4 (`DeepseekV4ForCausalLM`) `config.json` <-> `ModelConfig`.

The names are HF's; legacy keys that transformers' `DeepseekV4Config.__post_init__`
folds in are folded the same way (`compress_ratios`, `compress_rate_csa`,
`compress_rate_hca`, `num_hash_layers`, `qk_rope_head_dim`). What transformers
hard-codes is mapped to what it computes: one shared expert of width
`moe_intermediate_size` (whatever `n_shared_experts` says), top-k weights always
normalised, plain RoPE on sliding layers and the `compress` RoPE (YaRN, attention
factor 1) on compressed ones.

Example:
    >>> kw, notes = v4_fields_from_hf(json.load(open("hf/config.json")))
"""

from __future__ import annotations

from typing import Any

from deepseek_tf.config import ModelConfig
from deepseek_tf.config.v4 import V4_LAYER_TYPES
from deepseek_tf.errors import UserError

ARCHITECTURE = "DeepseekV4ForCausalLM"
#: Fields a V4 config.json needs (positive integers); intermediate_size is an alias.
REQUIRED = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "head_dim", "q_lora_rank", "n_routed_experts",
            "num_experts_per_tok", "max_position_embeddings")
_RATIO_TO_TYPE = {0: V4_LAYER_TYPES[0], 4: V4_LAYER_TYPES[1], 128: V4_LAYER_TYPES[2]}
_HF_DEFAULTS = dict(compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20,
                    hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8,
                    o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512)


def _get(hf: dict, key: str, default: Any = None) -> Any:
    v = hf.get(key)
    return default if v is None else v


def _layer_types(hf: dict, n: int) -> tuple[list[str], dict]:
    """(layer_types, compress rates) with HF's defaults and legacy keys folded in."""
    rates = {V4_LAYER_TYPES[1]: 4, V4_LAYER_TYPES[2]: 128, **(hf.get("compress_rates") or {})}
    for key, kind in (("compress_rate_csa", V4_LAYER_TYPES[1]),
                      ("compress_rate_hca", V4_LAYER_TYPES[2])):
        if hf.get(key) is not None:
            rates[kind] = hf[key]
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        bad = [r for r in hf["compress_ratios"] if r not in _RATIO_TO_TYPE]
        if bad:
            raise UserError(f"config.json: compress_ratios has {bad[0]}; transformers "
                            f"knows {sorted(_RATIO_TO_TYPE)}.")
        types = [_RATIO_TO_TYPE[r] for r in hf["compress_ratios"]]
    if types is None:
        types = [V4_LAYER_TYPES[2]] * min(n, 2) + [
            V4_LAYER_TYPES[1] if i % 2 else V4_LAYER_TYPES[2] for i in range(max(n - 2, 0))]
    return list(types)[:n], rates


def _mlp_layer_types(hf: dict, n: int) -> list[str]:
    types = hf.get("mlp_layer_types")
    if types is None:
        hashed = _get(hf, "num_hash_layers", 3)
        types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
    return list(types)[:n]


def v4_fields_from_hf(hf: dict, rope) -> tuple[dict, list[str]]:
    """(ModelConfig keyword arguments, notes) of a V4 config.json; `rope` is
    `hf_config._rope` (flattened RoPE fields of one rope-parameters dict)."""
    n, notes = hf["num_hidden_layers"], []
    head_dim = hf["head_dim"]
    # Legacy `rope_scaling` (DeepSeek's own config.json) wins, as in transformers.
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    main, compress = params.get("main"), params.get("compress")
    if not isinstance(main, dict) or not isinstance(compress, dict):  # flat (pre-fold) style
        flat = {k: v for k, v in params.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": _get(hf, "rope_theta", 10000.0)}
        compress = {"rope_type": flat.get("type", "default"), **flat,
                    "rope_theta": _get(hf, "compress_rope_theta", 160000.0)}
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
    if (main.get("rope_type") or "default") != "default":
        raise UserError(f"config.json: rope_parameters.main has rope_type "
                        f"{main['rope_type']!r}; DeepSeek-V4's sliding layers use default RoPE.")
    rotary = _get(hf, "partial_rotary_factor", _get(main, "partial_rotary_factor"))
    rope_dim = (int(head_dim * rotary) if rotary is not None
                else _get(hf, "qk_rope_head_dim", head_dim * 64 // 512))
    compressed = rope({**hf, "rope_parameters": compress, "rope_scaling": None})
    types, rates = _layer_types(hf, n)
    if _get(hf, "n_shared_experts", 1) != 1:
        notes.append(f"n_shared_experts={hf['n_shared_experts']} read as 1: transformers' "
                     f"DeepSeek-V4 has one shared expert of width moe_intermediate_size")
    kw = {k: _get(hf, k, v) for k, v in _HF_DEFAULTS.items()}
    kw.update(
        attention_type="v4", num_key_value_heads=1, head_dim=head_dim,
        qk_rope_head_dim=rope_dim, q_lora_rank=hf["q_lora_rank"],
        rope_theta=float(_get(main, "rope_theta", _get(hf, "rope_theta", 10000.0))),
        **{k: v for k, v in compressed.items() if k != "rope_theta"},
        layer_types=",".join(types), mlp_layer_types=",".join(_mlp_layer_types(hf, n)),
        compress_rate_csa=rates[V4_LAYER_TYPES[1]], compress_rate_hca=rates[V4_LAYER_TYPES[2]],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=1,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        scoring_func=_get(hf, "scoring_func", "sqrtsoftplus"), topk_method="noaux_tc",
        n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.5)))
    kw["compress_rope_theta"] = float(compressed["rope_theta"])
    for k in ("hc_eps", "swiglu_limit"):
        kw[k] = float(kw[k])
    if kw["scoring_func"] not in ("sqrtsoftplus", "sigmoid"):
        raise UserError(f"config.json: scoring_func={kw['scoring_func']!r}; transformers' "
                        f"DeepSeek-V4 supports sqrtsoftplus and sigmoid.")
    return kw, notes


_RELEASE_ROOT = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
                 "hc_head_scale": "model.hc_head.hc_scale"}


def is_release_layout(names) -> bool:
    """Whether tensor `names` are DeepSeek's own V4 names (`embed.weight`, `layers.*`)
    rather than those transformers' `save_pretrained` writes (`model.*`)."""
    return "embed.weight" in names


def from_release_name(name: str) -> str | None:
    """The name transformers' `save_pretrained` gives DeepSeek's own V4 tensor `name`
    (`layers.0.attn.wq_a.scale` -> `model.layers.0.attn.wq_a.weight_scale_inv`; the
    renames transformers' loader applies, plus the `model.` prefix). The MTP layer
    (`mtp.*`) keeps DeepSeek's names, which transformers does not load."""
    name = _RELEASE_ROOT.get(name, name)
    if name.startswith("layers."):
        name = "model." + name
    return name[:-len(".scale")] + ".weight_scale_inv" if name.endswith(".scale") else name


def check_exportable(cfg: ModelConfig) -> None:
    """What DeepseekV4ForCausalLM hard-codes; UserError naming the first mismatch."""
    problems = [
        (cfg.n_routed_experts > 0, "needs MoE layers (--model.n_routed_experts > 0)"),
        (cfg.hc_mult > 0, "needs hyper-connections (--model.hc_mult > 0)"),
        (cfg.scoring_func in ("sqrtsoftplus", "sigmoid"),
         "routes with --model.scoring_func=sqrtsoftplus or sigmoid"),
        (cfg.topk_method == "noaux_tc" and cfg.n_group == 1 and cfg.norm_topk_prob,
         "routes with --model.topk_method=noaux_tc --model.n_group=1 "
         "--model.norm_topk_prob=true"),
        (cfg.n_shared_experts == 1, "has exactly one shared expert "
                                    "(--model.n_shared_experts=1)"),
        (not cfg.attention_bias, "has no attention biases"),
        (cfg.swiglu_limit > 0, "always clips the experts (--model.swiglu_limit > 0; "
                               "DeepSeek-V4 uses 10)"),
    ]
    for ok, what in problems:
        if not ok:
            raise UserError(f"DeepseekV4ForCausalLM {what}.")


def v4_hf_config(cfg: ModelConfig, rope_parameters: dict) -> dict:
    """The V4-specific config.json fields; `rope_parameters` is the `compress` rope."""
    return dict(
        model_type="deepseek_v4", num_key_value_heads=1, head_dim=cfg.resolved_head_dim,
        q_lora_rank=cfg.q_lora_rank, moe_intermediate_size=cfg.moe_intermediate_size,
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.resolved_head_dim,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=1,
        num_experts_per_tok=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func,
        norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor,
        layer_types=list(cfg.resolved_layer_types),
        compress_rates={V4_LAYER_TYPES[1]: cfg.compress_rate_csa,
                        V4_LAYER_TYPES[2]: cfg.compress_rate_hca},
        compress_rope_theta=cfg.compress_rope_theta, hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe" if k == "hash_moe" else "moe"
                         for k in cfg.resolved_mlp_layer_types],
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers, mlp_bias=False, attention_bias=False,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                     "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.resolved_head_dim},
            "compress": {**rope_parameters, "rope_theta": cfg.compress_rope_theta,
                         "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.resolved_head_dim}})
