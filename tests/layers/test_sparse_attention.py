"""The chunked DSA paths equal the one-piece ones: `gathered_attention`'s custom
gradient against TensorFlow's own, and MLA's training call (indexer top-k by causal
query chunks, attention by chunks) against the same layer with chunking off."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers import attention_mask
from deepseek_tf.layers import mla as mla_module
from deepseek_tf.layers.indexer import select
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.sparse_attention import gathered_attention


def _gathered(chunk, jit, dtype=tf.float32):
    """Outputs and gradients of gathered_attention on fixed inputs with a fully masked
    query row, both outputs feeding the loss."""
    g = tf.random.Generator.from_seed(1)
    b, t, h, k = 2, 37, 3, 8
    q = tf.cast(g.normal((b, t, h, 10)), dtype)
    latent, rope = tf.cast(g.normal((b, t, 6)), dtype), tf.cast(g.normal((b, t, 4)), dtype)
    idx = g.uniform((b, t, k), 0, t, tf.int32)
    valid = tf.tensor_scatter_nd_update(g.uniform((b, t, k)) > 0.3, [[0, 5]],
                                        [tf.zeros(k, bool)])
    w, wp = g.normal((b, t, h, 10)), g.normal((b, h, t, k))

    @tf.function(jit_compile=jit)
    def run():
        with tf.GradientTape() as tape:
            tape.watch([q, latent, rope])
            ctx, probs = gathered_attention(q, (latent, rope), idx, valid, 0.3, chunk)
            loss = tf.reduce_sum(tf.cast(ctx, tf.float32) * w) + tf.reduce_sum(probs * wp)
        return [ctx, probs] + tape.gradient(loss, [q, latent, rope])
    return [tf.cast(v, tf.float32).numpy() for v in run()]


@pytest.mark.parametrize("chunk,jit", [(5, False), (64, False), (16, True)])
def test_chunked_gradient_equals_autodiff(chunk, jit):
    for want, got in zip(_gathered(None, False), _gathered(chunk, jit)):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_chunked_bfloat16_close_to_autodiff():
    for want, got in zip(_gathered(None, False, tf.bfloat16), _gathered(8, False, tf.bfloat16)):
        np.testing.assert_allclose(got, want, atol=0.05, rtol=0.02)


def _dsa_layer():
    tf.keras.utils.set_random_seed(3)
    layer = MultiHeadLatentAttention(hidden_size=32, num_heads=2, q_lora_rank=16,
                                     kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                     v_head_dim=8, index_topk=6, index_head_dim=8,
                                     index_n_heads=2)
    layer.build((2, None, 32))
    return layer


def _train_call(layer, x, seg):
    """Output, indexer KL and every gradient (LM-style loss + KL) of the training call."""
    pos = tf.maximum(tf.cumsum(tf.cast(seg > 0, tf.int32), axis=1) - 1, 0)
    with tf.GradientTape() as tape:
        out, aux = layer(x, positions=pos, attention_mask=attention_mask(seg), return_aux=True)
        kl = tf.reduce_sum(aux["indexer_kl"] * tf.cast(seg > 0, tf.float32))
        loss = tf.reduce_sum(tf.square(out)) + kl
    grads = tape.gradient(loss, layer.trainable_variables)
    return [out.numpy(), aux["indexer_kl"].numpy()] + [g.numpy() for g in grads]


def test_mla_training_call_chunked_equals_one_piece(monkeypatch):
    """T = 23 with query chunks of 5 (indexer) and 3 (attention), K = 6: the first
    indexer chunk sees only 6 keys, later ones grow; one row of the batch is padded."""
    layer = _dsa_layer()
    x = tf.random.stateless_normal((2, 23, 32), seed=[4, 2])
    seg = tf.constant([[1] * 23, [1] * 18 + [0] * 5], tf.int32)
    monkeypatch.setattr(mla_module, "INDEX_CHUNK", None)
    monkeypatch.setattr(mla_module, "CHUNK", None)
    want = _train_call(layer, x, seg)
    monkeypatch.setattr(mla_module, "INDEX_CHUNK", 5)
    monkeypatch.setattr(mla_module, "CHUNK", 3)
    got = _train_call(layer, x, seg)
    assert len(got) == 2 + len(layer.trainable_variables)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_indexer_top_k_by_causal_chunks_picks_the_same_sets():
    layer = _dsa_layer()
    x = tf.random.stateless_normal((2, 23, 32), seed=[5, 1])
    pos = tf.range(23)[tf.newaxis] + tf.zeros((2, 1), tf.int32)
    mask = attention_mask(tf.ones((2, 23), tf.int32))[:, 0]
    _, _, q_latent = layer._queries(x, pos)
    cos, sin = layer.rotary(pos)
    keys = layer.indexer.keys(x, cos, sin)
    full = layer.indexer.scores(x, q_latent, keys, cos, sin, mask)
    want = np.sort(select(full, 6).numpy(), -1)
    idx, values = layer.indexer.top_k(x, q_latent, keys, cos, sin, mask, 6, chunk=4)
    np.testing.assert_array_equal(np.sort(idx.numpy(), -1), want)
    np.testing.assert_allclose(values, tf.gather(full, idx, batch_dims=2), rtol=1e-5, atol=1e-9)
