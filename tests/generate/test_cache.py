"""Cached decoding equals full recomputation, for every attention kind and MoE.

The reference is the model's ordinary forward pass over the whole sequence (with
the same left padding expressed as segment ids and positions); the cached path
prefills part of it and decodes the rest one token at a time.
"""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.kv_cache import cache_masks, write_slots
from tests.helpers.workdirs import FAMILIES, random_model

TOL = 1e-4


def _batch(seed=0, t=20, pads=(0, 5)):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 256, size=(len(pads), t)).astype(np.int32)
    pad = np.array(pads, np.int32)
    real = np.arange(t)[None] >= pad[:, None]
    toks[~real] = 0
    positions = np.maximum(np.arange(t)[None] - pad[:, None], 0).astype(np.int32)
    return toks, pad, real.astype(np.int32), positions


def _full_logits(model, toks, seg, positions):
    return model(tf.constant(toks), segment_ids=tf.constant(seg),
                 positions=tf.constant(positions)).numpy()


def _cached_logits(model, toks, pad, prefill, max_length=32, absorb=True):
    cache = model.init_cache(toks.shape[0], max_length)
    logits, cache = model.call_cached(toks[:, :prefill], cache, 0, pad, absorb=absorb)
    steps = [logits.numpy()]
    for i in range(prefill, toks.shape[1]):
        logits, cache = model.call_cached(toks[:, i:i + 1], cache, i, pad, absorb=absorb)
        steps.append(logits.numpy())
    return np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decoding_equals_full_recomputation(family):
    model = random_model(family)
    toks, pad, seg, positions = _batch()
    full = _full_logits(model, toks, seg, positions)
    absorbs = (True, False) if model.config.uses_mla else (True,)
    for absorb in absorbs:
        got, _ = _cached_logits(model, toks, pad, prefill=9, absorb=absorb)
        for row, p in enumerate(pad):  # every real position, prefill and each decode step
            np.testing.assert_allclose(got[row, p:], full[row, p:], atol=TOL,
                                       err_msg=f"{family} absorb={absorb} row {row}")


def test_mla_cache_holds_only_latent_and_rope_key():
    model = random_model("mla_moe")
    cfg = model.config
    cache = model.init_cache(2, 32)
    assert len(cache) == cfg.num_hidden_layers
    for latent, rope in cache:
        assert latent.shape == (2, 1, 32, cfg.kv_lora_rank)
        assert rope.shape == (2, 1, 32, cfg.qk_rope_head_dim)


def test_absorbed_equals_naive_on_a_long_decode():
    model = random_model("mla")
    toks, pad, _, _ = _batch(seed=3, t=40, pads=(0, 11))
    a, cache_a = _cached_logits(model, toks, pad, prefill=4, max_length=48, absorb=True)
    b, cache_b = _cached_logits(model, toks, pad, prefill=4, max_length=48, absorb=False)
    for row, p in enumerate(pad):
        np.testing.assert_allclose(a[row, p:], b[row, p:], atol=TOL)
    # The same latent is cached: bit for bit in layer 0 (same inputs); later layers see
    # the previous layer's output, where the two paths round differently.
    (la, ra), (lb, rb) = cache_a[0], cache_b[0]
    np.testing.assert_array_equal(la.numpy(), lb.numpy())
    np.testing.assert_array_equal(ra.numpy(), rb.numpy())
    for (la, ra), (lb, rb) in zip(cache_a[1:], cache_b[1:]):
        np.testing.assert_allclose(la.numpy(), lb.numpy(), atol=TOL)
        np.testing.assert_allclose(ra.numpy(), rb.numpy(), atol=TOL)


def test_moe_decodes_dropless_even_with_a_tight_inference_capacity():
    """A finite inference capacity drops tokens in a full pass of a long batch; the
    cached path must not: it equals a dropless full pass."""
    model = random_model("mla_moe", inference_capacity_factor=0.5)
    dropless = random_model("mla_moe", inference_capacity_factor=0.0)
    dropless.set_weights(model.get_weights())
    toks, pad, seg, positions = _batch(seed=5)
    full = _full_logits(dropless, toks, seg, positions)
    got, _ = _cached_logits(model, toks, pad, prefill=6)
    for row, p in enumerate(pad):
        np.testing.assert_allclose(got[row, p:], full[row, p:], atol=TOL)


def test_write_slots_replaces_only_the_given_slots():
    cache = tf.reshape(tf.range(2 * 3 * 6 * 2, dtype=tf.float32), [2, 3, 6, 2])
    new = -tf.ones([2, 3, 2, 2])
    out = write_slots(cache, new, tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(out[:, :, 3:5], -1.0)
    np.testing.assert_array_equal(np.delete(out, [3, 4], axis=2),
                                  np.delete(cache.numpy(), [3, 4], axis=2))


def test_cache_masks_exclude_padding_future_and_far_slots():
    mask, local = cache_masks(tf.constant([5, 6]), tf.constant([0, 3]), 8, sliding_window=3)
    mask, local = mask.numpy()[:, 0], local.numpy()[:, 0]                  # (B, T, M)
    assert mask[0, 0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert mask[1, 1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert local[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert local[1, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_equals_the_general_cached_call(family):
    """`prefill` (the prompt attends itself, its keys are the cache, the head runs on
    the last position; MLA with keys and values expanded from the latents) gives the
    general path's last logits (expanded: `absorb=False`; V4 and DSA prefill through
    the general path itself) and, in every slot a real token wrote, its cache bitwise;
    slots after the prompt stay zero. The absorbed general path (the decode's) gives
    the same logits within rounding."""
    model = random_model(family)
    toks, pad, _, _ = _batch()
    cache = model.init_cache(toks.shape[0], 32)
    general = model.config.attention_type == "v4" or model.config.use_dsa  # absorbed there
    want, want_cache = model.call_cached(toks, cache, 0, pad, absorb=general)
    absorbed, _ = model.call_cached(toks, cache, 0, pad)
    got, got_cache = model.prefill(toks, 32, pad)
    np.testing.assert_allclose(got.numpy(), want[:, -1].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.numpy(), absorbed[:, -1].numpy(), atol=1e-5, rtol=0)
    for layer_want, layer_got in zip(want_cache, got_cache):
        for w, g in zip(layer_want, layer_got):
            assert g.shape == w.shape
            for row, p in enumerate(pad):
                np.testing.assert_array_equal(g[row, :, p:].numpy(), w[row, :, p:].numpy())
