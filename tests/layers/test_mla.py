"""Multi-head latent attention against an explicit numpy MLA (keys built per head)."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers import attention_mask
from deepseek_tf.layers.mla import MultiHeadLatentAttention, mla_softmax_scale
from deepseek_tf.layers.rope import yarn_get_mscale
from tests.helpers.layer_checks import check_layer


def _rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope_ref(x, pos, theta, interleave):
    """Rotates pairs: (x_2i, x_2i+1) if interleave (DeepSeek) else (x_i, x_i+D/2)."""
    d = x.shape[-1]
    ang = pos[..., None] * (1.0 / theta ** (np.arange(0, d, 2) / d))   # (B, T, D/2)
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :d // 2], x[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleave:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :d // 2], out[..., d // 2:] = ra, rb
    return out


def _reference(layer, x, pos, seg):
    w = lambda dense: dense.kernel.numpy()  # noqa: E731
    bias = lambda dense: dense.bias.numpy() if dense.use_bias else 0.0  # noqa: E731
    b, t, _ = x.shape
    h, nope, rope, dv = (layer.num_heads, layer.qk_nope_head_dim, layer.qk_rope_head_dim,
                         layer.v_head_dim)
    if layer.q_lora_rank:
        qa = x @ w(layer.q_a_proj) + bias(layer.q_a_proj)
        q = _rms(qa, layer.q_a_layernorm.scale.numpy()) @ w(layer.q_b_proj)
    else:
        q = x @ w(layer.q_proj)
    q = q.reshape(b, t, h, nope + rope)
    kv_a = x @ w(layer.kv_a_proj_with_mqa) + bias(layer.kv_a_proj_with_mqa)
    latent, k_rope = kv_a[..., :layer.kv_lora_rank], kv_a[..., layer.kv_lora_rank:]
    kv = (_rms(latent, layer.kv_a_layernorm.scale.numpy()) @ w(layer.kv_b_proj)).reshape(
        b, t, h, nope + dv)
    q_rope = _rope_ref(q[..., nope:], pos, layer.rope_theta, layer.rope_interleave)
    k_rope = _rope_ref(k_rope[:, :, None], pos, layer.rope_theta, layer.rope_interleave)
    q_full = np.concatenate([q[..., :nope], q_rope], -1)
    k_full = np.concatenate([kv[..., :nope], np.broadcast_to(k_rope, (b, t, h, rope))], -1)
    v = kv[..., nope:]
    scale = (nope + rope) ** -0.5
    out = np.zeros((b, t, h, dv))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                js = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
                s = np.array([q_full[bi, i, hi] @ k_full[bi, j, hi] for j in js]) * scale
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = sum(pj * v[bi, j, hi] for pj, j in zip(p, js))
    return out.reshape(b, t, h * dv) @ w(layer.o_proj) + bias(layer.o_proj)


@pytest.mark.parametrize("q_lora_rank,interleave,use_bias", [(12, True, False), (0, False, True)])
def test_mla_matches_explicit_reference(q_lora_rank, interleave, use_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 24)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1] * 7], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 2, 3], list(range(7))], np.int32)
    layer = MultiHeadLatentAttention(
        hidden_size=24, num_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=10,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, use_bias=use_bias,
        rope_theta=100.0, rope_interleave=interleave, initializer_range=0.3)
    out = check_layer(layer, (tf.constant(x),), dict(positions=tf.constant(pos),
                                                     attention_mask=attention_mask(tf.constant(seg))),
                      expected_shape=(2, 7, 24))
    names = {w.path.split("/")[-2] for w in layer.trainable_weights}
    assert ("q_a_proj" in names) == bool(q_lora_rank) and ("q_proj" in names) != bool(q_lora_rank)
    np.testing.assert_allclose(out.numpy(), _reference(layer, x, pos, seg), rtol=1e-4, atol=1e-5)


def test_yarn_softmax_scale_correction():
    s = {"type": "yarn", "factor": 40.0, "mscale_all_dim": 0.707}
    m = 0.1 * 0.707 * np.log(40.0) + 1.0
    assert mla_softmax_scale(192, s) == pytest.approx(192 ** -0.5 * m * m)
    assert yarn_get_mscale(40.0, 0.707) == pytest.approx(m)
    assert mla_softmax_scale(192, {**s, "mscale_all_dim": 0.0}) == pytest.approx(192 ** -0.5)
    assert mla_softmax_scale(192, None) == pytest.approx(192 ** -0.5)
