"""Rotary position embeddings (RoPE): plain, YaRN and llama3 frequency scaling; the
rotate-half (HF Llama) and interleaved-pair (DeepSeek checkpoint) layouts.

The inverse frequencies and the cos/sin `attention_factor` follow Hugging Face's
`modeling_rope_utils` (`_compute_yarn_parameters`, `_compute_llama3_parameters`), so
converted checkpoints give the same logits. They are computed once in numpy float32.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config import RopeScaling


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    factor, orig = s.factor, s.original_max_position_embeddings
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_share = 1.0 - ramp
    inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
    attention_factor = s.attention_factor
    if not attention_factor:
        if s.mscale and s.mscale_all_dim:
            attention_factor = (yarn_get_mscale(factor, s.mscale)
                                / yarn_get_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    factor, orig = s.factor, s.original_max_position_embeddings
    low, high = s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(dim: int, theta: float, scaling: RopeScaling | dict | None = None
                     ) -> tuple[np.ndarray, float]:
    """(inverse frequencies (dim/2,), cos/sin attention factor) for a RoPE config.

    Args:
      dim: the rotated width (even).
      theta: the frequency base.
      scaling: None, or `ModelConfig.resolved_rope_scaling` (or its `to_dict()`).
    """
    scaling = RopeScaling.coerce(scaling)
    inv_freq = 1.0 / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if not scaling:
        return inv_freq.astype(np.float32), 1.0
    if scaling.type == "yarn":
        return _yarn(dim, theta, scaling)
    return _llama3(inv_freq, scaling), 1.0  # RopeScaling allows no other type


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RotaryEmbedding(keras.layers.Layer):
    """Maps integer positions to the cos/sin tables of rotary embeddings.

    Args:
      dim: the rotated width (even).
      theta: the frequency base.
      scaling: optional RoPE scaling (`ModelConfig.resolved_rope_scaling`, or its
        `to_dict()` as `get_config` writes it): YaRN or llama3.

    Example:
        >>> cos, sin = RotaryEmbedding(dim=8)(tf.range(4)[None])
        >>> cos.shape
        TensorShape([1, 4, 8])
    """

    def __init__(self, dim: int, theta: float = 10000.0,
                 scaling: RopeScaling | dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.theta, self.scaling = dim, theta, RopeScaling.coerce(scaling)
        inv_freq, self.attention_factor = rope_frequencies(dim, theta, self.scaling)
        self._inv_freq = inv_freq

    def inverse_frequencies(self) -> tf.Tensor:
        return tf.constant(self._inv_freq, tf.float32)  # (D/2,)

    def call(self, positions):
        angles = tf.expand_dims(tf.cast(positions, tf.float32), -1) * self.inverse_frequencies()
        angles = tf.concat([angles, angles], axis=-1)   # (B, T, D)
        cos, sin = tf.cos(angles), tf.sin(angles)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "theta": self.theta,
                "scaling": self.scaling.to_dict() if self.scaling else None}


def apply_rotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor, interleave: bool = False
                 ) -> tf.Tensor:
    """Rotates `x` (B, T, H, D) by position; cos/sin are (B, T, D) float32.

    With `interleave`, the input's pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout)
    and the output is laid out rotate-half style, like HF's
    `apply_rotary_pos_emb_interleave`; queries and keys get the same permutation, so
    attention scores equal the interleaved rotation's.
    """
    cos = tf.expand_dims(cos, 2)  # (B, T, 1, D)
    sin = tf.expand_dims(sin, 2)
    x32 = tf.cast(x, tf.float32)
    if interleave:  # a static permutation: evens then odds (a rank-5 reshape + unstack
        # gave wrong values in TFLite)
        d = x.shape[-1]
        x32 = tf.gather(x32, list(range(0, d, 2)) + list(range(1, d, 2)), axis=-1)
    x1, x2 = tf.split(x32, 2, axis=-1)                      # (B, T, H, D/2) each
    rotated = tf.concat([-x2, x1], axis=-1)
    return tf.cast(x32 * cos + rotated * sin, x.dtype)


def rotate_tail_pairs(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    """DeepSeek-V4 RoPE: rotates the interleaved pairs of the last `cos.shape[-1]` dims of
    `x` (B, T, H, D) and keeps their layout (V4's values carry RoPE, so the layout
    matters); the leading dims pass. cos/sin (B, T, R) come from `RotaryEmbedding(R)`;
    negate `sin` to undo the rotation.
    """
    r = cos.shape[-1]
    nope, rope = tf.split(x, [x.shape[-1] - r, r], axis=-1)
    # apply_rotary's interleave leaves evens then odds: gather them back into pairs.
    back = [i // 2 + (r // 2) * (i % 2) for i in range(r)]
    rope = tf.gather(apply_rotary(rope, cos, sin, interleave=True), back, axis=-1)
    return tf.concat([nope, rope], axis=-1)
