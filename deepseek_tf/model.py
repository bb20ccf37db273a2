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
from deepseek_tf.layers.remat import fold_seed, maybe_remat


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DeepSeekCausalLM(keras.Model):
    """A DeepSeek-style decoder-only LM.

    Args:
      config: a `ModelConfig` (or its dict).
      remat: gradient checkpointing, "none", "block" (recompute each decoder block in
        the backward pass), "mlp" or "attention" (only that sub-layer). A training
        choice, not part of `get_config`.

    Call args:
      inputs: int32 (B, T) token ids.
      segment_ids: int32 (B, T) document ids of packed windows (default: one
        document per row).
      positions: int32 (B, T) positions within each document (default 0..T-1).
      training: enables dropout (`attention_dropout`, `hidden_dropout`).
      dropout_seed: int (2,) stateless seed of this call's dropout masks (the train
        step passes one per step, micro-batch and replica); drawn at random if None.

    Returns float32 logits (B, T, vocab_size).
    """

    def __init__(self, config, remat: str = "none", **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        cfg = self.config
        self.remat = remat
        self.embed_tokens = keras.layers.Embedding(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.blocks = [DecoderBlock(cfg, i, remat=remat, name=f"layers_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")
        self.lm_head = None if cfg.tie_word_embeddings else keras.layers.Dense(
            cfg.vocab_size, use_bias=False, name="lm_head",
            kernel_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.build_weights()

    def build_weights(self) -> None:
        """Creates every variable (a forward pass on a tiny batch)."""
        self(tf.zeros((1, 2), tf.int32))

    def call(self, inputs, segment_ids=None, positions=None, training=False, dropout_seed=None):
        inputs = tf.convert_to_tensor(inputs)
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        if segment_ids is None:
            segment_ids = tf.ones([b, t], tf.int32)
        if positions is None:
            positions = tf.broadcast_to(tf.range(t, dtype=tf.int32), [b, t])
        mask = attention_mask(segment_ids)                 # (B, 1, T, T)
        x = self.embed_tokens(inputs)                      # (B, T, D)
        seed = self._dropout_seed(training, dropout_seed)
        for i, block in enumerate(self.blocks):
            run = lambda h, block=block, s=fold_seed(seed, i): block(  # noqa: E731
                h, positions=positions, attention_mask=mask, training=training, dropout_seed=s)
            x = maybe_remat(run, self.remat == "block")(x)
        x = self.norm(x)
        if self.lm_head is None:
            logits = tf.matmul(x, tf.cast(self.embed_tokens.embeddings, x.dtype), transpose_b=True)
        else:
            logits = self.lm_head(x)
        return tf.cast(logits, tf.float32)                 # (B, T, V)

    def _dropout_seed(self, training, dropout_seed):
        """The call's dropout seed, drawn outside any remat'd block when not given."""
        cfg = self.config
        if not training or not (cfg.attention_dropout or cfg.hidden_dropout):
            return None
        if dropout_seed is None:
            return tf.random.uniform([2], maxval=2 ** 31 - 1, dtype=tf.int32)
        return dropout_seed

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
