"""The causal language model: embedding, decoder blocks, final norm, output head.

Example:
    >>> cfg = ModelConfig(vocab_size=300, hidden_size=32, num_attention_heads=4,
    ...                   num_hidden_layers=2, intermediate_size=64)
    >>> model = DeepSeekCausalLM(cfg)
    >>> model(tf.zeros((2, 8), tf.int32)).shape
    TensorShape([2, 8, 300])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers import DecoderBlock, RMSNorm, attention_mask


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DeepSeekCausalLM(keras.Model):
    """A DeepSeek-style decoder-only LM.

    Args:
      config: a `ModelConfig` (or its dict).

    Call args:
      inputs: int32 (B, T) token ids.
      segment_ids: int32 (B, T) document ids of packed windows (default: one
        document per row).
      positions: int32 (B, T) positions within each document (default 0..T-1).

    Returns float32 logits (B, T, vocab_size).
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        cfg = self.config
        self.embed_tokens = keras.layers.Embedding(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.blocks = [DecoderBlock(cfg, i, name=f"layers_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")
        self.lm_head = None if cfg.tie_word_embeddings else keras.layers.Dense(
            cfg.vocab_size, use_bias=False, name="lm_head",
            kernel_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.build_weights()

    def build_weights(self) -> None:
        """Creates every variable (a forward pass on a tiny batch)."""
        self(tf.zeros((1, 2), tf.int32))

    def call(self, inputs, segment_ids=None, positions=None, training=False):
        inputs = tf.convert_to_tensor(inputs)
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        if segment_ids is None:
            segment_ids = tf.ones([b, t], tf.int32)
        if positions is None:
            positions = tf.broadcast_to(tf.range(t, dtype=tf.int32), [b, t])
        mask = attention_mask(segment_ids)                 # (B, 1, T, T)
        x = self.embed_tokens(inputs)                      # (B, T, D)
        for block in self.blocks:
            x = block(x, positions=positions, attention_mask=mask)
        x = self.norm(x)
        if self.lm_head is None:
            logits = tf.matmul(x, tf.cast(self.embed_tokens.embeddings, x.dtype), transpose_b=True)
        else:
            logits = self.lm_head(x)
        return tf.cast(logits, tf.float32)                 # (B, T, V)

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}


def token_losses(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Per-token cross entropy in float32 (B, T)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(logits, tf.float32))


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    trainable = sum(int(tf.size(v)) for v in model.trainable_variables)
    total = sum(int(tf.size(v)) for v in model.variables)
    return trainable, total
