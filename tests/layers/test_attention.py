import numpy as np
import tensorflow as tf

from deepseek_tf.layers import GroupedQueryAttention, attention_mask
from tests.helpers.layer_checks import check_layer


def test_mask_is_causal_and_same_segment():
    seg = tf.constant([[1, 1, 2, 2, 2, 0]])
    m = attention_mask(seg).numpy()[0, 0]
    for i in range(6):
        for j in range(6):
            assert m[i, j] == (j <= i and seg[0, i] == seg[0, j]), (i, j)


def _reference_attention(layer, x, positions, seg):
    """Loop-based GQA from the layer's weights (numpy)."""
    h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).numpy().reshape(x.shape[0], x.shape[1], h, d)
    k = layer.k_proj(x).numpy().reshape(x.shape[0], x.shape[1], kv, d)
    v = layer.v_proj(x).numpy().reshape(x.shape[0], x.shape[1], kv, d)
    cos, sin = (t.numpy() for t in layer.rotary(positions))

    def rot(a):
        a1, a2 = np.split(a, 2, -1)
        return a * cos[:, :, None] + np.concatenate([-a2, a1], -1) * sin[:, :, None]

    q, k = rot(q), rot(k)
    b, t = x.shape[:2]
    out = np.zeros((b, t, h, d), np.float32)
    for bi in range(b):
        for hi in range(h):
            ki = hi // (h // kv)
            for i in range(t):
                js = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, ki] for j in js]) / np.sqrt(d)
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                out[bi, i, hi] = sum(pj * v[bi, j, ki] for pj, j in zip(p, js))
    return layer.o_proj(out.reshape(b, t, h * d)).numpy()


def test_gqa_matches_loop_reference_with_packed_segments():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 7, 16)).astype(np.float32))
    seg = np.array([[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 0, 1], list(range(7))], np.int32)
    layer = GroupedQueryAttention(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4,
                                  use_bias=True)
    out = check_layer(layer, (x,), dict(positions=tf.constant(pos),
                                        attention_mask=attention_mask(tf.constant(seg))),
                      expected_shape=(2, 7, 16))
    ref = _reference_attention(layer, x, tf.constant(pos), seg)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)
