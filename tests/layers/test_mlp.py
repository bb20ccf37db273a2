import numpy as np
import tensorflow as tf

from deepseek_tf.layers import GatedMLP
from tests.helpers.layer_checks import check_layer


def test_swiglu_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    layer = GatedMLP(hidden_size=8, intermediate_size=12)
    out = check_layer(layer, (tf.constant(x),), expected_shape=(2, 3, 8))
    g = x @ layer.gate_proj.kernel.numpy()
    u = x @ layer.up_proj.kernel.numpy()
    ref = (g / (1 + np.exp(-g)) * u) @ layer.down_proj.kernel.numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
