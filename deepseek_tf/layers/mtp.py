"""Multi-token prediction (MTP) modules: DeepSeek-V3's, and V4's over hyper-connections.

Module k (1..D) keeps the causal chain: at position i it combines the previous
depth's hidden state h^{k-1}_i (the main model's last residual stream for k = 1)
with the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])
    h^k  = block_k(h')                                  # one decoder block
    logits^k_i = head(norm_k(h^k_i))  -> predicts t_{i+k+1}

The embedding and output head are the main model's (shared). The concatenation
order (embedding first) and the names (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`) follow DeepSeek-V3's released checkpoint layout.

With hyper-connections (DeepSeek-V4, `hc_mult` = N > 0), h^{k-1} is the N residual
streams (B, T, N, d) before the head's collapse, as in DeepSeek-V4's released
`MTPBlock`: the embedding's projection is added to every stream,

    h'_{i,n} = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h^{k-1}_{i,n}))

the block runs on the streams, and the module's own `HyperHead` collapses them before
`norm_k` and the shared head. (`e_proj`/`h_proj` are `eh_proj`'s two halves.)
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.block import DecoderBlock
from deepseek_tf.layers.hyper import HyperHead
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
    return_aux=False, dropout_seed=None)` -> (norm(h_k), h_k[, aux]): the caller applies
    the shared head to the first (B, T, d) and feeds the second (B, T, d), or the
    (B, T, N, d) streams with hyper-connections, to the next depth.

    Example:
        >>> cfg = ModelConfig(hidden_size=16, num_attention_heads=4, intermediate_size=32)
        >>> mtp = MTPModule(cfg, depth=1)
    """

    def __init__(self, config, depth: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        self.depth = depth
        cfg = self.config
        dense = lambda name: keras.layers.Dense(  # noqa: E731
            cfg.hidden_size, use_bias=False, name=name,
            kernel_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.enorm = RMSNorm(cfg.rms_norm_eps, name="enorm")
        self.hnorm = RMSNorm(cfg.rms_norm_eps, name="hnorm")
        if cfg.hc_mult:  # V4: separate projections (the embedding's is shared by streams)
            self.e_proj, self.h_proj = dense("e_proj"), dense("h_proj")
            self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps,
                                     cfg.rms_norm_eps, cfg.initializer_range, name="hc_head")
        else:
            self.eh_proj = dense("eh_proj")
        self.block = DecoderBlock(cfg, cfg.num_hidden_layers + depth - 1, name="block")
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")

    def build(self, input_shape):
        d = self.config.hidden_size
        lead = tuple(input_shape[:-1])
        self.enorm.build(input_shape)
        self.hnorm.build(input_shape)
        if self.config.hc_mult:
            self.e_proj.build(lead[:2] + (d,))
            self.h_proj.build(input_shape)
            self.hc_head.build(input_shape)
        else:
            self.eh_proj.build(lead + (2 * d,))
        self.block.build(input_shape)
        self.norm.build(lead[:2] + (d,))

    def call(self, h_prev, next_embeddings, positions, attention_mask, training=False,
             return_aux=False, dropout_seed=None):
        e = self.enorm(next_embeddings)                                     # (B, T, d)
        if self.config.hc_mult:                  # h_prev: (B, T, N, d) streams
            x = tf.expand_dims(self.e_proj(e), 2) + self.h_proj(self.hnorm(h_prev))
        else:
            x = self.eh_proj(tf.concat([e, self.hnorm(h_prev)], -1))       # (B, T, d)
        h, aux = self.block(x, positions=positions, attention_mask=attention_mask,
                            training=training, return_aux=True, dropout_seed=dropout_seed)
        normed = self.norm(self.hc_head(h) if self.config.hc_mult else h)   # (B, T, d)
        return (normed, h, aux) if return_aux else (normed, h)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(), "depth": self.depth}
