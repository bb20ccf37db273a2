"""The causal LM: shapes, causality, packed-document isolation, tied embeddings."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.model import DeepSeekCausalLM, count_params
from tests.helpers import tiny


@pytest.fixture(scope="module")
def model():
    return DeepSeekCausalLM(tiny.model_config())


def _tokens(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, size=shape), tf.int32)


def _assert_causal(model, seed, atol):
    """Changing tokens 8.. leaves the logits of tokens 0..7 unchanged (and changes later ones)."""
    a = _tokens((1, 12), seed=seed).numpy()
    b = a.copy()
    b[0, 8:] = (b[0, 8:] + 5) % 256
    la, lb = model(tf.constant(a)).numpy(), model(tf.constant(b)).numpy()
    np.testing.assert_allclose(la[0, :8], lb[0, :8], atol=atol)
    assert not np.allclose(la[0, 8:], lb[0, 8:])
    return a


def test_logits_shape_and_dtype(model):
    logits = model(_tokens((2, 9)))
    assert logits.shape == (2, 9, 264) and logits.dtype == tf.float32


def test_causal_future_tokens_do_not_change_past_logits(model):
    _assert_causal(model, seed=1, atol=1e-6)


def test_packed_documents_do_not_see_each_other(model):
    """Changing one document leaves the logits of another in the same window unchanged."""
    tokens = _tokens((1, 16), seed=2).numpy()
    seg = np.array([[1] * 5 + [2] * 7 + [3] * 4], np.int32)
    pos = np.array([list(range(5)) + list(range(7)) + list(range(4))], np.int32)
    changed = tokens.copy()
    changed[0, :5] = (changed[0, :5] + 17) % 256     # edit document 1 only
    run = lambda t: model(tf.constant(t), segment_ids=tf.constant(seg),
                          positions=tf.constant(pos)).numpy()
    base, other = run(tokens), run(changed)
    np.testing.assert_allclose(base[0, 5:], other[0, 5:], atol=1e-6)  # documents 2 and 3
    assert not np.allclose(base[0, :5], other[0, :5])
    # A document packed after others equals the same document alone at positions 0..n-1.
    alone = model(tf.constant(tokens[:, 5:12])).numpy()
    np.testing.assert_allclose(base[0, 5:12], alone[0], atol=1e-5)


def test_tied_embeddings_have_no_head_and_fewer_params(model):
    tied = DeepSeekCausalLM(tiny.model_config(tie_word_embeddings=True))
    assert tied.lm_head is None
    cfg = tiny.model_config()
    assert count_params(model)[0] - count_params(tied)[0] == cfg.vocab_size * cfg.hidden_size
    assert tied(_tokens((1, 4))).shape == (1, 4, cfg.vocab_size)


def test_model_config_round_trip(model):
    clone = DeepSeekCausalLM.from_config(model.get_config())
    assert clone.config == model.config
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]


@pytest.fixture(scope="module")
def deepseek():
    """MLA + MoE (dense first layer, noaux_tc groups) + MTP, dropless at inference."""
    return DeepSeekCausalLM(tiny.model_config(
        attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, rope_interleave=True, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4,
        topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=1))


def test_deepseek_model_is_causal_and_isolates_packed_documents(deepseek):
    a = _assert_causal(deepseek, seed=3, atol=1e-5)
    seg = np.array([[1] * 5 + [2] * 7], np.int32)
    pos = np.array([list(range(5)) + list(range(7))], np.int32)
    packed = deepseek(tf.constant(a), segment_ids=tf.constant(seg), positions=tf.constant(pos))
    alone = deepseek(tf.constant(a[:, 5:])).numpy()
    np.testing.assert_allclose(packed.numpy()[0, 5:], alone[0], atol=1e-5)


def test_deepseek_aux_outputs(deepseek):
    logits, aux = deepseek(_tokens((2, 10)), training=True, return_aux=True)
    assert logits.shape == (2, 10, 264)
    assert aux["expert_load"].shape == (2, 8)          # layer 1 and the MTP block
    np.testing.assert_allclose(aux["expert_load"].numpy().sum(-1), 2 * 10 * 2)
    assert len(aux["mtp_logits"]) == 1 and aux["mtp_logits"][0].shape == (2, 10, 264)
    assert len(deepseek.moe_layers) == 2


def test_checkpoint_holds_every_model_variable(deepseek, tmp_path):
    """Including the non-trainable router biases and the blocks of the layer list."""
    path = tf.train.Checkpoint(model=deepseek).save(str(tmp_path / "ckpt"))
    saved = set(tf.train.load_checkpoint(path).get_variable_to_shape_map())
    saved = {k for k in saved if k.startswith("model/")}
    assert len(saved) == len(deepseek.variables)
    assert sum("e_score_correction_bias" in k for k in saved) == 2
    clone = DeepSeekCausalLM.from_config(deepseek.get_config())
    tf.train.Checkpoint(model=clone).restore(path).assert_existing_objects_matched()
    for a, b in zip(clone.variables, deepseek.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
