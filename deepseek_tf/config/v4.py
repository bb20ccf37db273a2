"""Validation of `ModelConfig`'s DeepSeek-V4 fields (HF `DeepseekV4Config` names):
per-layer attention and MoE kinds, compression rates, hyper-connections."""

from __future__ import annotations

from deepseek_tf.config.base import _split_list

#: DeepSeek-V4's attention types (HF `layer_types` values).
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention",
                  "heavily_compressed_attention")
#: Routed feed-forward kinds of `mlp_layer_types` (HF's names).
MLP_LAYER_TYPES = ("hash_moe", "moe")


def check_v4(cfg) -> None:
    """Validates the DeepSeek-V4 fields of a `ModelConfig` (one ConfigError line)."""
    r, n = cfg._require, cfg.num_hidden_layers
    r(cfg.hc_mult >= 0, f"--model.hc_mult must be >= 0 (0 = plain residual), got "
                        f"{cfg.hc_mult}.")
    r(cfg.hc_sinkhorn_iters >= 1, "--model.hc_sinkhorn_iters must be >= 1.")
    r(cfg.hc_eps > 0, "--model.hc_eps must be > 0.")
    r(cfg.swiglu_limit >= 0, "--model.swiglu_limit must be >= 0 (0 = off).")
    for name, types, allowed in (("layer_types", cfg.layer_types, V4_LAYER_TYPES),
                                 ("mlp_layer_types", cfg.mlp_layer_types, MLP_LAYER_TYPES)):
        got = _split_list(types)
        r(not got or len(got) == n, f"--model.{name} has {len(got)} entries but "
                                    f"--model.num_hidden_layers={n}: give one per layer.")
        bad = sorted(set(got) - set(allowed))
        r(not bad, f"--model.{name}: unknown {', '.join(bad)}; use {', '.join(allowed)}.")
    if cfg.mlp_layer_types:
        r(cfg.n_routed_experts > 0, "--model.mlp_layer_types needs MoE "
                                     "(--model.n_routed_experts > 0).")
    if cfg.attention_type != "v4":
        r(not cfg.layer_types, "--model.layer_types needs --model.attention_type=v4.")
        return
    r(cfg.hc_mult >= 1, "--model.attention_type=v4 needs --model.hc_mult >= 1 "
                         "(DeepSeek-V4's residual streams; it uses 4).")
    r(cfg.resolved_kv_heads == 1, "--model.attention_type=v4 shares one key/value head: "
                                   "set --model.num_key_value_heads=1.")
    r(cfg.q_lora_rank > 0, "--model.attention_type=v4 needs --model.q_lora_rank > 0.")
    r(cfg.sliding_window > 0, "--model.sliding_window must be > 0 with v4 attention.")
    r(cfg.attention_dropout == 0, "--model.attention_dropout must be 0 with v4 attention "
                                  "(DeepSeek-V4 has none; use --model.hidden_dropout).")
    d = cfg.resolved_head_dim
    r(0 < cfg.qk_rope_head_dim <= d and cfg.qk_rope_head_dim % 2 == 0,
      f"--model.qk_rope_head_dim={cfg.qk_rope_head_dim} must be even and in 1..head "
      f"dim {d} (v4 rotates each head's last qk_rope_head_dim dims).")
    r(cfg.compress_rope_theta > 0, "--model.compress_rope_theta must be > 0.")
    r(cfg.o_groups > 0 and cfg.o_lora_rank > 0,
      "--model.o_groups and --model.o_lora_rank must be > 0 with v4 attention.")
    r(cfg.num_attention_heads % cfg.o_groups == 0,
      f"--model.o_groups={cfg.o_groups} must divide --model.num_attention_heads="
      f"{cfg.num_attention_heads}.")
    types = cfg.resolved_layer_types
    for kind, name in (("compressed_sparse_attention", "compress_rate_csa"),
                       ("heavily_compressed_attention", "compress_rate_hca")):
        if kind in types:
            r(getattr(cfg, name) > 0,
              f"--model.{name} must be > 0, got {getattr(cfg, name)}.")
    if "compressed_sparse_attention" in types:
        check_indexer(cfg)


def check_indexer(cfg) -> None:
    """The lightning indexer's fields (V3.2's DSA and V4's CSA layers)."""
    r = cfg._require
    r(cfg.index_topk > 0, f"--model.index_topk must be > 0, got {cfg.index_topk}.")
    r(cfg.index_n_heads > 0, f"--model.index_n_heads must be > 0, got {cfg.index_n_heads}.")
    r(cfg.index_head_dim >= cfg.qk_rope_head_dim,
      f"--model.index_head_dim={cfg.index_head_dim} must be >= --model.qk_rope_head_dim="
      f"{cfg.qk_rope_head_dim} (RoPE covers qk_rope_head_dim of its dims).")
    r(cfg.indexer_loss_weight >= 0, "--model.indexer_loss_weight must be >= 0.")
