"""Multi-token prediction: layer checks, causality, the shifted targets and masks,
and that the MTP loss trains the MTP weights."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers import attention_mask
from deepseek_tf.layers.mtp import MTPModule, shift_left
from deepseek_tf.model import DeepSeekCausalLM, token_losses
from deepseek_tf.train.aux_losses import mtp_loss_sum
from tests.helpers import tiny
from tests.helpers.layer_checks import check_layer


def test_mtp_module_checks():
    cfg = tiny.model_config(num_nextn_predict_layers=1)
    rng = np.random.default_rng(0)
    h, e = (tf.constant(rng.normal(size=(2, 5, 32)).astype(np.float32)) for _ in range(2))
    seg = tf.ones((2, 5), tf.int32)
    pos = tf.broadcast_to(tf.range(5), (2, 5))
    mtp = MTPModule(cfg, depth=1)
    check_layer(mtp, (h, e, pos, attention_mask(seg)), expected_shape=(2, 5, 32))
    assert mtp.block.layer_idx == cfg.num_hidden_layers


def test_shift_left():
    t = tf.constant([[1, 2, 3, 4]])
    np.testing.assert_array_equal(shift_left(t, 1).numpy(), [[2, 3, 4, 0]])
    np.testing.assert_array_equal(shift_left(t, 3).numpy(), [[4, 0, 0, 0]])


FAMILIES = {"v3": {}, "v4": tiny.V4}  # V4: MTP over hyper-connection streams


@pytest.mark.parametrize("family", FAMILIES)
def test_mtp_logits_are_causal(family):
    """Depth k at position i sees tokens up to i + k only (it predicts i + k + 1)."""
    model = DeepSeekCausalLM(tiny.model_config(**FAMILIES[family], num_nextn_predict_layers=2))
    a = np.random.default_rng(1).integers(0, 256, size=(1, 12)).astype(np.int32)
    b = a.copy()
    b[0, 8:] = (b[0, 8:] + 7) % 256
    _, aux_a = model(tf.constant(a), return_aux=True)
    _, aux_b = model(tf.constant(b), return_aux=True)
    for k, (la, lb) in enumerate(zip(aux_a["mtp_logits"], aux_b["mtp_logits"]), start=1):
        la, lb = la.numpy()[0], lb.numpy()[0]
        np.testing.assert_allclose(la[:8 - k], lb[:8 - k], atol=1e-5)
        assert not np.allclose(la[8 - k], lb[8 - k], atol=1e-4)


def test_mtp_loss_targets_and_document_mask():
    rng = np.random.default_rng(2)
    logits = tf.constant(rng.normal(size=(1, 6, 10)).astype(np.float32))
    targets = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 2]], np.int32)
    mask = np.array([[1, 1, 0, 1, 1, 1]], np.float32)   # target 2 crosses a boundary
    batch = {"targets": tf.constant(targets), "segment_ids": tf.constant(seg),
             "loss_mask": tf.constant(mask)}
    got = float(mtp_loss_sum(logits, batch, 1))
    ce = token_losses(logits, tf.constant([[2, 3, 4, 5, 6, 0]])).numpy()[0]
    # position i predicts targets[i+1]; valid: same document and a valid target
    valid = [True, False, False, True, True, False]
    assert abs(got - ce[valid].sum()) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_mtp_loss_is_finite_and_trains_the_mtp_weights(family):
    from deepseek_tf.train.step import make_grad_fn
    model = DeepSeekCausalLM(tiny.model_config(**FAMILIES[family], num_nextn_predict_layers=1,
                                               mtp_loss_weight=0.3))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, size=(1, 2, 9)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "segment_ids": np.ones((1, 2, 8), np.int32),
             "positions": np.broadcast_to(np.arange(8), (1, 2, 8)).astype(np.int32),
             "loss_mask": np.ones((1, 2, 8), np.float32)}
    batch = {k: tf.constant(v) for k, v in batch.items()}
    grads, loss, stats = make_grad_fn(model, 1, False)(batch, tf.constant(16.0))
    assert np.isfinite(float(loss)) and np.isfinite(stats["mtp_loss_sum"].numpy()).all()
    by_name = {v.path: g for v, g in zip(model.trainable_variables, grads)}
    mtp = [p for p in by_name if "mtp_1" in p]
    assert mtp and all(float(tf.reduce_max(tf.abs(by_name[p]))) > 0 for p in mtp)
