"""DeepSeek-V3 multi-token prediction (MTP) modules.

Module k (1..D) keeps the causal chain: at position i it combines the previous
depth's hidden state h^{k-1}_i (the main model's last residual stream for k = 1)
with the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])
    h^k  = block_k(h')                                  # one decoder block
    logits^k_i = head(norm_k(h^k_i))  -> predicts t_{i+k+1}

The embedding and output head are the main model's (shared). The concatenation
order (embedding first) and the names (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`) follow DeepSeek-V3's released checkpoint layout.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.block import DecoderBlock
from deepseek_tf.layers.norm import RMSNorm


def shift_left(tokens: tf.Tensor, k: int) -> tf.Tensor:
    """(B, T) tokens moved k places left, zero-padded at the end: out[:, i] = in[:, i+k]."""
    t = tf.shape(tokens)[1]
    padded = tf.concat([tokens, tf.zeros_like(tokens)], axis=1)   # (B, 2T) covers k <= T
    return padded[:, k:k + t] if k else tokens


@keras.saving.register_keras_serializable(package="deepseek_tf")
class MTPModule(keras.layers.Layer):
    """One MTP depth: norms, projection, a decoder block and its own final norm.

    Args:
      config: the model config (a `ModelConfig` or its dict).
      depth: k, 1-based.

    Call: `mtp(h_prev, next_embeddings, positions, attention_mask, training=False,
    return_aux=False, dropout_seed=None)` -> (norm(h_k), h_k[, aux]): the caller applies the shared head to
    the first and feeds the second to the next depth.

    Example:
        >>> cfg = ModelConfig(hidden_size=16, num_attention_heads=4, intermediate_size=32)
        >>> mtp = MTPModule(cfg, depth=1)
    """

    def __init__(self, config, depth: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        self.depth = depth
        cfg = self.config
        self.enorm = RMSNorm(cfg.rms_norm_eps, name="enorm")
        self.hnorm = RMSNorm(cfg.rms_norm_eps, name="hnorm")
        self.eh_proj = keras.layers.Dense(
            cfg.hidden_size, use_bias=False, name="eh_proj",
            kernel_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.block = DecoderBlock(cfg, cfg.num_hidden_layers + depth - 1, name="block")
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")

    def build(self, input_shape):
        lead = tuple(input_shape[:-1])
        self.enorm.build(input_shape)
        self.hnorm.build(input_shape)
        self.eh_proj.build(lead + (2 * self.config.hidden_size,))
        self.block.build(input_shape)
        self.norm.build(input_shape)

    def call(self, h_prev, next_embeddings, positions, attention_mask, training=False,
             return_aux=False, dropout_seed=None):
        x = self.eh_proj(tf.concat([self.enorm(next_embeddings), self.hnorm(h_prev)], -1))
        out = self.block(x, positions=positions, attention_mask=attention_mask,
                         training=training, return_aux=True, dropout_seed=dropout_seed)
        h, aux = out
        return (self.norm(h), h, aux) if return_aux else (self.norm(h), h)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(), "depth": self.depth}
