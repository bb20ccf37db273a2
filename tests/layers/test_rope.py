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
