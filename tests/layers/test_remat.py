"""Gradient checkpointing: same loss and gradients as without, with and without dropout."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.mlp import GatedMLP
from deepseek_tf.model import DeepSeekCausalLM, token_losses
from tests.helpers import tiny

DROPOUT = {"attention_dropout": 0.2, "hidden_dropout": 0.2}


def _batch(seed=0):
    tokens = np.random.default_rng(seed).integers(0, 256, (2, 17))
    return tf.constant(tokens[:, :-1], tf.int32), tf.constant(tokens[:, 1:], tf.int32)


def _loss_and_grads(model, seed):
    inputs, targets = _batch()

    @tf.function  # remat's known traps only show inside tf.function (BUILD.md, Known traps)
    def run(seed):
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True, dropout_seed=seed)
            loss = tf.reduce_mean(token_losses(logits, targets))
        return loss, [tf.convert_to_tensor(g)
                      for g in tape.gradient(loss, model.trainable_variables)]

    loss, grads = run(tf.constant(seed, tf.int64))
    return float(loss), [g.numpy() for g in grads]


# Traced MLP calls in one forward+backward of a 2-block model: 1 per block, 2 if recomputed.
MLP_CALLS = {"none": 2, "block": 4, "mlp": 4, "attention": 2}


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_remat_matches_no_remat_and_really_recomputes(dropout, monkeypatch):
    calls = []
    real_call = GatedMLP.call
    monkeypatch.setattr(GatedMLP, "call", lambda self, x: calls.append(1) or real_call(self, x))
    cfg = tiny.model_config(num_hidden_layers=2, **(DROPOUT if dropout else {}))
    base = DeepSeekCausalLM(cfg)
    seed = [3, 4]
    calls.clear()
    loss_a, grads_a = _loss_and_grads(base, seed)
    assert len(calls) == MLP_CALLS["none"]
    for remat in ("block", "mlp", "attention"):
        model = DeepSeekCausalLM(cfg, remat=remat)
        model.set_weights(base.get_weights())
        calls.clear()
        loss_b, grads_b = _loss_and_grads(model, seed)
        assert len(calls) == MLP_CALLS[remat], remat
        np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-5, err_msg=remat)
        for v, a, b in zip(model.trainable_variables, grads_a, grads_b):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{remat} {v.path}")


def test_dropout_is_seeded_and_active():
    model = DeepSeekCausalLM(tiny.model_config(**DROPOUT))
    inputs, _ = _batch()
    run = lambda seed: model(inputs, training=True, dropout_seed=tf.constant(seed)).numpy()
    np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
    assert not np.allclose(run([1, 2]), run([1, 3]))
    np.testing.assert_array_equal(model(inputs).numpy(), model(inputs, training=False).numpy())
    assert not np.allclose(model(inputs).numpy(), run([1, 2]))
