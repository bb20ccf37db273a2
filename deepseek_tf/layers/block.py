"""The pre-norm decoder block: two residual lines."""

from __future__ import annotations

import keras

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.attention import GroupedQueryAttention
from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.remat import REMAT_MODES, fold_seed, maybe_remat, stateless_dropout


def make_attention(cfg: ModelConfig, layer_idx: int) -> keras.layers.Layer:
    """The attention layer that `cfg.attention_type` selects."""
    del layer_idx  # the hybrid local/global mix will use it
    if cfg.attention_type == "gqa":
        return GroupedQueryAttention(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.resolved_kv_heads, head_dim=cfg.resolved_head_dim,
            use_bias=cfg.attention_bias, rope_theta=cfg.rope_theta,
            initializer_range=cfg.initializer_range, attention_dropout=cfg.attention_dropout,
            name="self_attn")
    raise ValueError(f"unknown attention_type {cfg.attention_type!r}")


def make_mlp(cfg: ModelConfig, layer_idx: int) -> keras.layers.Layer:
    """The feed-forward layer of block `layer_idx`."""
    del layer_idx  # MoE layers will use it
    return GatedMLP(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    activation=cfg.hidden_act, initializer_range=cfg.initializer_range,
                    name="mlp")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DecoderBlock(keras.layers.Layer):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`.

    Args:
      config: the model config (a `ModelConfig` or its dict).
      layer_idx: index of the block in the stack.
      remat: "attention" or "mlp" recomputes that sub-layer in the backward pass
        (the model handles "block"); "none"/"block" keep the sub-layers' activations.

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

    def build(self, input_shape):
        for layer in (self.input_layernorm, self.self_attn, self.post_attention_layernorm,
                      self.mlp):
            layer.build(input_shape)

    def call(self, x, positions, attention_mask, training=False, dropout_seed=None):
        seed = dropout_seed if training else None  # (2,) int: stateless, remat-safe
        rate = self.config.hidden_dropout

        def attn(h):
            out = self.self_attn(self.input_layernorm(h), positions=positions,
                                 attention_mask=attention_mask,
                                 dropout_seed=fold_seed(seed, 0))
            return stateless_dropout(out, rate, fold_seed(seed, 1))

        def mlp(h):
            return stateless_dropout(self.mlp(self.post_attention_layernorm(h)), rate,
                                     fold_seed(seed, 2))

        x = x + maybe_remat(attn, self.remat == "attention")(x)
        return x + maybe_remat(mlp, self.remat == "mlp")(x)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "layer_idx": self.layer_idx, "remat": self.remat}
