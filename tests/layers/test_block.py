import numpy as np
import tensorflow as tf

from deepseek_tf.layers import DecoderBlock, attention_mask
from tests.helpers import tiny
from tests.helpers.layer_checks import check_layer


def test_block_shape_config_round_trip_and_gradients():
    cfg = tiny.model_config()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, cfg.hidden_size)), tf.float32)
    seg = tf.ones((2, 5), tf.int32)
    pos = tf.broadcast_to(tf.range(5), (2, 5))
    block = DecoderBlock(cfg, layer_idx=1)
    check_layer(block, (x,), dict(positions=pos, attention_mask=attention_mask(seg)),
                expected_shape=(2, 5, cfg.hidden_size))
    assert block.get_config()["config"] == cfg.to_dict()


def test_moe_block_returns_aux_and_dense_block_an_empty_one():
    cfg = tiny.model_config(n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=1)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 5, cfg.hidden_size)), tf.float32)
    args = dict(positions=tf.broadcast_to(tf.range(5), (2, 5)),
                attention_mask=attention_mask(tf.ones((2, 5), tf.int32)))
    moe_block = DecoderBlock(cfg, layer_idx=1)
    assert moe_block.is_moe and not DecoderBlock(cfg, layer_idx=0).is_moe
    check_layer(moe_block, (x,), args, expected_shape=(2, 5, cfg.hidden_size), atol=1e-5)
    y, aux = moe_block(x, return_aux=True, **args)
    assert set(aux) == {"load", "dropped", "balance_loss", "z_loss"}
    np.testing.assert_allclose(y.numpy(), moe_block(x, **args).numpy(), atol=1e-6)
    assert DecoderBlock(cfg, layer_idx=0)(x, return_aux=True, **args)[1] == {}
