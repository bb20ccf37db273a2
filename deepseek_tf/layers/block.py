"""The pre-norm decoder block: two residual lines."""

from __future__ import annotations

import keras

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.attention import GroupedQueryAttention
from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.layers.norm import RMSNorm


def make_attention(cfg: ModelConfig, layer_idx: int) -> keras.layers.Layer:
    """The attention layer that `cfg.attention_type` selects."""
    del layer_idx  # the hybrid local/global mix will use it
    if cfg.attention_type == "gqa":
        return GroupedQueryAttention(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.resolved_kv_heads, head_dim=cfg.resolved_head_dim,
            use_bias=cfg.attention_bias, rope_theta=cfg.rope_theta,
            initializer_range=cfg.initializer_range, name="self_attn")
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

    Example:
        >>> cfg = ModelConfig(hidden_size=16, num_attention_heads=4, intermediate_size=32)
        >>> block = DecoderBlock(cfg, layer_idx=0)
    """

    def __init__(self, config, layer_idx: int = 0, **kwargs):
        super().__init__(**kwargs)
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

    def call(self, x, positions, attention_mask):
        x = x + self.self_attn(self.input_layernorm(x), positions=positions,
                               attention_mask=attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "layer_idx": self.layer_idx}
