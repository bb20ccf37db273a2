"""The pre-norm decoder block: two residual lines."""

from __future__ import annotations

import keras

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.attention import GroupedQueryAttention
from deepseek_tf.layers.hyper import HyperConnection, hyper_residual
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.layers.moe import DeepSeekMoE, dropless_factor
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.remat import REMAT_MODES, fold_seed, maybe_remat, stateless_dropout
from deepseek_tf.layers.v4_attention import V4Attention


def _v4_attention(cfg: ModelConfig, layer_idx: int) -> V4Attention:
    kind = cfg.layer_type(layer_idx)
    sliding = kind == "sliding_attention"
    # HF: sliding layers use the plain `main` RoPE; compressed ones `compress`, scaled.
    return V4Attention(
        hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        head_dim=cfg.resolved_head_dim, rope_head_dim=cfg.qk_rope_head_dim,
        q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        sliding_window=cfg.sliding_window, layer_type=kind,
        compress_rate=0 if sliding else (cfg.compress_rate_csa if
                                         kind == "compressed_sparse_attention"
                                         else cfg.compress_rate_hca),
        rope_theta=cfg.rope_theta if sliding else cfg.compress_rope_theta,
        rope_scaling=None if sliding else cfg.resolved_rope_scaling,
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range, name="self_attn")


def make_attention(cfg: ModelConfig, layer_idx: int) -> keras.layers.Layer:
    """The attention layer that `cfg.attention_type` selects (hybrid: on `hybrid_base`)."""
    if cfg.attention_type == "v4":
        return _v4_attention(cfg, layer_idx)
    hybrid = dict(sliding_window=cfg.sliding_window, global_weight=cfg.hybrid_global_weight,
                  local_weight=cfg.hybrid_local_weight) if cfg.attention_type == "hybrid" else {}
    if cfg.uses_mla:
        dsa = dict(index_topk=cfg.index_topk, index_head_dim=cfg.index_head_dim,
                   index_n_heads=cfg.index_n_heads) if cfg.use_dsa else {}
        return MultiHeadLatentAttention(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, use_bias=cfg.attention_bias, rope_theta=cfg.rope_theta,
            rope_scaling=cfg.resolved_rope_scaling, rope_interleave=cfg.rope_interleave,
            initializer_range=cfg.initializer_range, attention_dropout=cfg.attention_dropout,
            name="self_attn", **hybrid, **dsa)
    return GroupedQueryAttention(
        hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.resolved_kv_heads, head_dim=cfg.resolved_head_dim,
        use_bias=cfg.attention_bias, rope_theta=cfg.rope_theta,
        initializer_range=cfg.initializer_range, rope_scaling=cfg.resolved_rope_scaling,
        attention_dropout=cfg.attention_dropout, name="self_attn", **hybrid)


def make_mlp(cfg: ModelConfig, layer_idx: int) -> keras.layers.Layer:
    """The feed-forward layer of block `layer_idx`: dense SwiGLU or DeepSeekMoE (hash
    routing for `hash_moe` layers)."""
    if cfg.is_moe_layer(layer_idx):
        hashed = cfg.mlp_layer_type(layer_idx) == "hash_moe"
        return DeepSeekMoE(
            hidden_size=cfg.hidden_size, num_experts=cfg.n_routed_experts,
            top_k=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
            n_shared_experts=cfg.n_shared_experts, scoring_func=cfg.scoring_func,
            topk_method="hash" if hashed else cfg.topk_method, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            capacity_factor=cfg.capacity_factor,
            inference_capacity_factor=cfg.inference_capacity_factor,
            activation=cfg.hidden_act, initializer_range=cfg.initializer_range,
            swiglu_limit=cfg.swiglu_limit, vocab_size=cfg.vocab_size if hashed else 0,
            weight_quantization=cfg.weight_quantization,
            expert_parallel=cfg.expert_parallel, name="mlp")
    return GatedMLP(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    activation=cfg.hidden_act, initializer_range=cfg.initializer_range,
                    swiglu_limit=cfg.swiglu_limit, name="mlp")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DecoderBlock(keras.layers.Layer):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`; with hyper-connections
    (`hc_mult > 0`) x is the (B, T, N, d) streams and each residual goes through an
    `HyperConnection` (see `layers.hyper`).

    Args:
      config: the model config (a `ModelConfig` or its dict).
      layer_idx: index of the block in the stack (MTP blocks continue the count).
      remat: "attention" or "mlp" recomputes that sub-layer in the backward pass
        (the model handles "block"); "none"/"block" keep the sub-layers' activations.

    Call: `block(x, positions, attention_mask, training=False, return_aux=False,
    dropout_seed=None, moe_capacity_factor=None, input_ids=None)` (input_ids (B, T):
    hash-routed MoE layers'); with `return_aux` it returns (x, aux),
    aux being the MoE layer's dict (empty for a dense block) plus, with DSA, the
    attention's `indexer_kl` (B, T). `moe_capacity_factor`
    overrides the MoE layer's configured factor (see `DeepSeekMoE`). Side outputs are
    returned, never stored, so a recomputed (remat) block stays correct.

    Example:
        >>> cfg = ModelConfig(hidden_size=16, num_attention_heads=4, intermediate_size=32)
        >>> block = DecoderBlock(cfg, layer_idx=0)
    """

    def __init__(self, config, layer_idx: int = 0, remat: str = "none", **kwargs):
        super().__init__(**kwargs)
        if remat not in REMAT_MODES:
            raise ValueError(f"remat={remat!r} is not one of {REMAT_MODES}")
        self.remat = remat
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        self.layer_idx = layer_idx
        cfg = self.config
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")
        self.self_attn = make_attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")
        self.mlp = make_mlp(cfg, layer_idx)
        self.is_moe = isinstance(self.mlp, DeepSeekMoE)
        hc = dict(hidden_size=cfg.hidden_size, hc_mult=cfg.hc_mult,
                  sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                  norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range)
        self.attn_hc = HyperConnection(**hc, name="attn_hc") if cfg.hc_mult else None
        self.ffn_hc = HyperConnection(**hc, name="ffn_hc") if cfg.hc_mult else None

    def build(self, input_shape):
        if self.attn_hc is not None:  # input_shape is the streams' (B, T, N, d)
            self.attn_hc.build(input_shape)
            self.ffn_hc.build(input_shape)
            input_shape = tuple(input_shape[:2]) + (input_shape[-1],)
        for layer in (self.input_layernorm, self.self_attn, self.post_attention_layernorm,
                      self.mlp):
            layer.build(input_shape)

    def _residual(self, hc, sublayer, x):
        """(x after `sublayer` and its residual, the sub-layer's aux): plain `x + out`,
        or through the hyper-connection `hc` when x is streams."""
        if hc is None:
            out, aux = sublayer(x)
            return x + out, aux
        post, comb, collapsed = hc(x)
        out, aux = sublayer(collapsed)
        return hyper_residual(x, out, post, comb), aux

    def call(self, x, positions, attention_mask, training=False, return_aux=False,
             dropout_seed=None, moe_capacity_factor=None, input_ids=None):
        seed = dropout_seed if training else None  # (2,) int: stateless, remat-safe
        rate = self.config.hidden_dropout

        # DSA (V3.2) and V4's CSA layers return their indexer's KL loss.
        dsa_aux = return_aux and getattr(self.self_attn, "indexer", None) is not None

        v4 = self.config.attention_type == "v4"

        def attn(h):
            out = self.self_attn(self.input_layernorm(h), positions=positions,
                                 attention_mask=attention_mask,
                                 **({} if v4 else {"dropout_seed": fold_seed(seed, 0)}),
                                 **({"return_aux": True} if dsa_aux else {}))
            out, aux = out if dsa_aux else (out, {})
            return stateless_dropout(out, rate, fold_seed(seed, 1)), aux

        def mlp(h):
            h = self.post_attention_layernorm(h)
            out, aux = (self.mlp(h, training=training, return_aux=True,
                                 capacity_factor=moe_capacity_factor, input_ids=input_ids)
                        if self.is_moe else (self.mlp(h), {}))
            return stateless_dropout(out, rate, fold_seed(seed, 2)), aux

        x, attn_aux = self._residual(self.attn_hc, maybe_remat(attn, self.remat == "attention"), x)
        x, aux = self._residual(self.ffn_hc, maybe_remat(mlp, self.remat == "mlp"), x)
        return (x, {**aux, **attn_aux}) if return_aux else x

    def call_cached(self, x, positions, cache, slots, mask, local_mask=None, absorb=True,
                    static_moe=False, input_ids=None, key_positions=None):
        """The block on new tokens against a KV cache (inference: no dropout, MoE
        dropless). `static_moe` gives every expert a buffer of all the call's tokens
        (static shapes, still exact; for TFLite) instead of the largest load (a
        data-dependent shape). V4 blocks also take the tokens' `input_ids` (hash
        routing) and every slot's `key_positions` (B, M). Returns (x, updated cache);
        see `DeepSeekCausalLM.call_cached`."""
        if self.config.attention_type == "v4":
            kwargs = {"key_positions": key_positions}
        else:
            kwargs = {"absorb": absorb} if self.config.uses_mla else {}

        def attn(h):
            return self.self_attn.call_cached(self.input_layernorm(h), positions, cache,
                                              slots, mask, local_mask, **kwargs)

        def mlp(h):
            h = self.post_attention_layernorm(h)
            if not self.is_moe:
                return self.mlp(h), None
            return self.mlp(h, capacity_factor=dropless_factor(self.config, static_moe),
                            input_ids=input_ids), None

        x, cache = self._residual(self.attn_hc, attn, x)
        return self._residual(self.ffn_hc, mlp, x)[0], cache

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "layer_idx": self.layer_idx, "remat": self.remat}
