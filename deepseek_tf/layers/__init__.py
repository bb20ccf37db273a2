"""Keras 3 layers of the DeepSeek family (TensorFlow backend)."""

from deepseek_tf.layers.attention import GroupedQueryAttention, attention_mask
from deepseek_tf.layers.block import DecoderBlock
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.layers.norm import RMSNorm
from deepseek_tf.layers.rope import RotaryEmbedding, apply_rotary
from deepseek_tf.layers.router import TopkRouter

__all__ = ["DecoderBlock", "DeepSeekMoE", "GatedMLP", "GroupedQueryAttention",
           "MultiHeadLatentAttention", "RMSNorm", "RotaryEmbedding", "TopkRouter",
           "apply_rotary", "attention_mask"]
