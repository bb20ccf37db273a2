import numpy as np
import tensorflow as tf

from deepseek_tf.layers import RMSNorm
from tests.helpers.layer_checks import check_layer


def test_rmsnorm_matches_numpy_and_round_trips():
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    layer = RMSNorm(epsilon=1e-5)
    out = check_layer(layer, (tf.constant(x),), expected_shape=(2, 5, 8))
    layer.scale.assign(np.linspace(0.5, 2.0, 8).astype(np.float32))
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 2.0, 8)
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert out.dtype == tf.float32


def test_rmsnorm_keeps_input_dtype_with_float32_math():
    x = tf.constant(np.full((1, 2, 4), 300.0, np.float16))  # x**2 overflows float16
    layer = RMSNorm(dtype="mixed_float16")
    y = layer(x)
    assert layer.scale.dtype == "float32"
    assert y.dtype == tf.float16
    np.testing.assert_allclose(y.numpy().astype(np.float32), 1.0, atol=1e-3)
