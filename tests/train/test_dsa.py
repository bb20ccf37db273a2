"""DeepSeek Sparse Attention training (V3.2 paper): the dense warm-up trains only the
indexers (the main model, router biases included, stays bitwise unchanged) and their
KL falls; sparse training logs `indexer_loss`, and the gradients keep the two losses
apart (the LM loss never reaches an indexer, the KL never reaches the main model)."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import ConfigError
from deepseek_tf.model import DeepSeekCausalLM, token_losses
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from deepseek_tf.workdir import load_workdir
from tests.helpers import tiny
from tests.train.test_moe_training import MOE

quiet = lambda *_: None  # noqa: E731
DSA = dict(MOE, use_dsa=True, index_topk=8, index_head_dim=8, index_n_heads=2,
           num_nextn_predict_layers=1)


def _weights(workdir):
    return {v.path.split("/", 1)[1]: v.numpy() for v in load_workdir(workdir)[0].variables}


def _indexer_losses(workdir):
    return [r["indexer_loss"] for r in read_log(workdir) if r["kind"] == "train"]


def test_sparse_then_dense_warmup_stages(stdlib_data, tmp_path):
    """Sparse training (remat, bfloat16 compute) logs the indexer loss; a warm-up run
    initialised from it changes only indexer weights and lowers their KL."""
    _, data_dir, _ = stdlib_data
    sparse = str(tmp_path / "sparse")
    train(tiny.experiment(data_dir, model=DSA, train={
        "steps": 2, "log_every": 1, "eval_every": 0, "remat": "block",
        "precision": "mixed_bfloat16"}), sparse, log=quiet)
    assert all(np.isfinite(_indexer_losses(sparse)))
    warm = str(tmp_path / "warm")
    train(tiny.experiment(data_dir, model=DSA, optim={"learning_rate": 1e-2},
                          train={"steps": 12, "log_every": 1, "eval_every": 0,
                                 "dsa_stage": "dense_warmup", "init_from": sparse}),
          warm, log=quiet)
    before, after = _weights(sparse), _weights(warm)
    main = [k for k in before if "indexer" not in k]
    indexer = [k for k in before if "indexer" in k]
    assert any("e_score_correction_bias" in k for k in main) and len(indexer) >= 8
    for k in main:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert all(not np.array_equal(before[k], after[k]) for k in indexer)
    kl = _indexer_losses(warm)
    assert np.mean(kl[-3:]) < np.mean(kl[:3]), kl


def test_sparse_stage_gradients_keep_the_losses_apart():
    model = DeepSeekCausalLM(tiny.model_config(**DSA))
    tokens = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 24)), tf.int32)
    with tf.GradientTape(persistent=True) as tape:
        logits, aux = model(tokens, training=True, return_aux=True)
        lm = tf.reduce_mean(token_losses(logits[:, :-1], tokens[:, 1:]))
        kl = tf.reduce_sum(aux["indexer_kl"])
    indexer = [v for v in model.trainable_variables if "indexer" in v.path]
    main = [v for v in model.trainable_variables if "indexer" not in v.path]
    assert len(indexer) == 5 * 3  # (wq_b, wk, k_norm x 2, weights_proj) x 3 blocks (MTP too)
    assert all(g is None for g in tape.gradient(lm, indexer))
    assert all(g is None for g in tape.gradient(kl, main))
    grads = tape.gradient(kl, indexer)
    assert all(g is not None for g in grads) and sum(float(tf.norm(g)) for g in grads) > 0
    assert any(g is not None for g in tape.gradient(lm, main))


def test_dense_warmup_needs_a_dsa_model():
    with pytest.raises(ConfigError, match="dsa_stage=dense_warmup"):
        tiny.experiment("/nonexistent", train={"dsa_stage": "dense_warmup"})
