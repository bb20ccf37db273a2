import pytest
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


def test_sliding_window_mask():
    from deepseek_tf.layers.attention import sliding_window_mask
    m = sliding_window_mask(5, 2).numpy()
    assert all(m[i, j] == (0 <= i - j < 2) for i in range(5) for j in range(5))


def _hybrid_pair(cls, window, **kw):
    """(hybrid layer, plain layer with the same weights)."""
    hybrid = cls(sliding_window=window, global_weight=0.7, local_weight=0.3, **kw)
    plain = cls(**kw)
    return hybrid, plain


@pytest.mark.parametrize("base", ["gqa", "mla"])
def test_hybrid_with_a_window_covering_the_sequence_equals_global_attention(base):
    from deepseek_tf.layers.mla import MultiHeadLatentAttention
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 6, 16)).astype(np.float32))
    seg = tf.constant([[1, 1, 1, 2, 2, 2], [1] * 6])
    pos = tf.constant([[0, 1, 2, 0, 1, 2], list(range(6))])
    kw = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4) if base == "gqa" else \
        dict(hidden_size=16, num_heads=4, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4,
             qk_rope_head_dim=2, v_head_dim=4)
    cls = GroupedQueryAttention if base == "gqa" else MultiHeadLatentAttention
    hybrid, plain = _hybrid_pair(cls, window=6, **kw)
    args = dict(positions=pos, attention_mask=attention_mask(seg))
    out = check_layer(hybrid, (x,), args, expected_shape=(2, 6, 16))
    plain(x, **args)
    for dst, src in zip(plain.weights, hybrid.weights):
        dst.assign(src)
    np.testing.assert_allclose(out.numpy(), plain(x, **args).numpy(), atol=1e-6)
    # A window of 1: the local branch attends to the token itself only.
    one, _ = _hybrid_pair(cls, window=1, **kw)
    one(x, **args)
    for dst, src in zip(one.weights, hybrid.weights):
        dst.assign(src)
    assert not np.allclose(one(x, **args).numpy(), out.numpy(), atol=1e-4)


def test_hybrid_local_branch_matches_windowed_reference():
    """global 0 / local 1: the loop reference restricted to the last `window` keys."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(1, 7, 16)).astype(np.float32))
    seg = np.ones((1, 7), np.int32)
    pos = np.arange(7)[None].astype(np.int32)
    layer = GroupedQueryAttention(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8,
                                  sliding_window=3, global_weight=0.0, local_weight=1.0)
    out = layer(x, positions=tf.constant(pos), attention_mask=attention_mask(tf.constant(seg)))
    # Documents of 3 tokens ending at each query reproduce the window with the reference.
    h, d = 2, 8
    q = layer.q_proj(x).numpy().reshape(1, 7, h, d)
    k = layer.k_proj(x).numpy().reshape(1, 7, h, d)
    v = layer.v_proj(x).numpy().reshape(1, 7, h, d)
    cos, sin = (t.numpy() for t in layer.rotary(tf.constant(pos)))
    rot = lambda a: a * cos[:, :, None] + np.concatenate(  # noqa: E731
        [-a[..., d // 2:], a[..., :d // 2]], -1) * sin[:, :, None]
    q, k = rot(q), rot(k)
    ref = np.zeros((1, 7, h, d))
    for hi in range(h):
        for i in range(7):
            js = list(range(max(0, i - 2), i + 1))
            s = np.array([q[0, i, hi] @ k[0, j, hi] for j in js]) / np.sqrt(d)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            ref[0, i, hi] = sum(pj * v[0, j, hi] for pj, j in zip(p, js))
    np.testing.assert_allclose(out.numpy(), layer.o_proj(ref.reshape(1, 7, h * d)).numpy(),
                               rtol=1e-4, atol=1e-5)
