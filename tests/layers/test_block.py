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
