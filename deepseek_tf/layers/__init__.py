"""Keras 3 layers of the DeepSeek family (TensorFlow backend)."""

from deepseek_tf.layers.attention import GroupedQueryAttention, attention_mask
from deepseek_tf.layers.block import DecoderBlock
from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.rope import RotaryEmbedding, apply_rotary

__all__ = ["DecoderBlock", "GatedMLP", "GroupedQueryAttention", "RMSNorm",
           "RotaryEmbedding", "apply_rotary", "attention_mask"]
