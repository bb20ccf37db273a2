import pytest
import numpy as np
import tensorflow as tf

from deepseek_tf.layers import RotaryEmbedding, apply_rotary
from tests.helpers.layer_checks import check_layer


def _reference(x, positions, theta):
    """Rotary embedding as complex rotation of (x_i, x_{i + D/2}) pairs."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[..., None] * inv                        # (B, T, D/2)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * ang)[:, :, None, :]
    return np.concatenate([z.real, z.imag], -1)


def test_rotary_matches_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 50, size=(2, 6))
    rope = RotaryEmbedding(dim=8, theta=500.0)
    cos, sin = check_layer(rope, (tf.constant(pos),), expected_shape=(2, 6, 8))
    got = apply_rotary(tf.constant(x), cos, sin).numpy()
    np.testing.assert_allclose(got, _reference(x, pos, 500.0), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)
    rope = RotaryEmbedding(dim=8)

    def score(pq, pk):
        cq, sq = rope(tf.constant([[pq]]))
        ck, sk = rope(tf.constant([[pk]]))
        return float(tf.reduce_sum(apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)))

    assert abs(score(3, 1) - score(13, 11)) < 1e-4
    assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_interleaved_rope_gives_the_scores_of_pairwise_rotation():
    """DeepSeek rotates (x_2i, x_2i+1); our output is permuted like HF's, scores are equal."""
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(2, 1, 5, 1, 8)).astype(np.float32)
    pos = np.arange(5)[None]
    cos, sin = RotaryEmbedding(dim=8, theta=100.0)(tf.constant(pos))
    ours = [apply_rotary(tf.constant(a), cos, sin, interleave=True).numpy() for a in (q, k)]
    inv = 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8)

    def pairwise(a):
        z = (a[..., 0::2] + 1j * a[..., 1::2]) * np.exp(1j * pos[..., None] * inv)[:, :, None]
        out = np.empty_like(a)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    ref = [pairwise(a) for a in (q, k)]
    np.testing.assert_allclose(np.einsum("bthd,bshd->ts", *ours),
                               np.einsum("bthd,bshd->ts", *ref), rtol=1e-5, atol=1e-5)


def _yarn_reference(dim, theta, factor, orig, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023) in float64: ramp between interpolation and extrapolation."""
    import math
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    corr = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))  # noqa
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def test_yarn_frequencies_and_attention_factor():
    from deepseek_tf.layers.rope import rope_frequencies
    s = dict(type="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=32.0,
             beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5, attention_factor=0.0)
    inv, factor = rope_frequencies(16, 10000.0, s)
    np.testing.assert_allclose(inv, _yarn_reference(16, 10000.0, 8.0, 64, 32.0, 1.0), rtol=1e-5)
    g = lambda m: 0.1 * m * np.log(8.0) + 1.0  # noqa: E731
    assert factor == pytest.approx(g(1.0) / g(0.5))
    _, plain = rope_frequencies(16, 10000.0, {**s, "mscale": 0.0})
    assert plain == pytest.approx(g(1.0))
    cos, _ = RotaryEmbedding(16, 10000.0, s)(tf.zeros((1, 1), tf.int32))
    np.testing.assert_allclose(cos.numpy(), factor, rtol=1e-6)  # cos(0) * attention factor
