"""The output-error AWQ search against Keras' own 4-bit quantizer."""

import numpy as np
import pytest
from keras.src.quantizers.quantizers import (compute_quantization_parameters,
                                             dequantize_with_sz_map, quantize_with_sz_map)

from deepseek_tf.awq import MAXQ, search


def _keras_dequantized(w, scale, zero, group_size):
    """Keras' quantize-dequantize of `w` (out, in) with its group parameters."""
    g_idx = np.arange(w.shape[1]) // group_size
    q = quantize_with_sz_map(w, scale, zero, g_idx, MAXQ)
    return np.asarray(dequantize_with_sz_map(q, scale, zero, g_idx))


@pytest.mark.parametrize("group_size", [32, 24])      # 24: groups of 24, 24 and 16
def test_the_search_beats_round_to_nearest_on_the_output_with_keras_own_rounding(group_size):
    """Inputs with a few large channels (what AWQ protects): the output error of the
    chosen scales is below plain round-to-nearest's, clipping lowers it further, and
    each error is what Keras' own quantize/dequantize of the returned variables gives,
    also where the group size does not divide the width (Keras' last group is then
    narrower)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (512, 64)) * np.where(np.arange(64) % 16 == 3, 20.0, 1.0)  # (N, in)
    kernel = rng.normal(0, 0.1, (64, 24))                                   # (in, out)
    gram = x.T @ x
    s, scaled, scale, zero, errors = search(gram, np.abs(x).mean(0), kernel, group_size)

    def output_error(dequantized):
        return float(np.sum((x @ (kernel - dequantized.T)) ** 2))
    keras_scale, keras_zero, _ = compute_quantization_parameters(
        kernel.T.astype(np.float32), bits=4, per_channel=True, group_size=group_size)
    rtn = _keras_dequantized(kernel.T.astype(np.float32), keras_scale, keras_zero, group_size)
    np.testing.assert_allclose(errors["rtn"], output_error(rtn), rtol=1e-4)
    np.testing.assert_allclose(scaled, kernel.T * s, rtol=1e-5)
    chosen = _keras_dequantized(scaled, scale, zero, group_size) / s        # (out, in)
    np.testing.assert_allclose(errors["clipped"], output_error(chosen), rtol=1e-4)
    assert errors["clipped"] <= errors["scaled"] < 0.9 * errors["rtn"], errors
    assert s[3] > s[4], s                           # the large channels are scaled up


def test_the_block_search_shares_one_scale_and_lowers_the_block_output_error():
    """Two projections reading one input (gate/up) inside a small SwiGLU block: the
    shared scales of `block_search` give the block-output error it reports (recomputed
    here with numpy from the fake-quantized kernels: each token's squared error over the
    mean square of its float output, summed), below alpha = 0's, and they protect the
    large input channels."""
    import tensorflow as tf

    from deepseek_tf.awq import block_search, fake_quantized
    rng = np.random.default_rng(0)
    big = np.where(np.arange(32) % 8 == 5, 10.0, 1.0)
    x = (rng.normal(0, 1, (4, 16, 32)) * big).astype(np.float32)          # (N, T, D)
    gate, up = (tf.Variable(rng.normal(0, 0.2, (32, 48)).astype(np.float32)) for _ in "gu")
    down = rng.normal(0, 0.2, (48, 32)).astype(np.float32)

    def swiglu(h, g, u):
        a = h @ g
        return h + (a / (1 + np.exp(-a))) * (h @ u) @ down

    def block(h):
        return swiglu(np.asarray(h, np.float64), gate.numpy(), up.numpy())
    floats = gate.numpy(), up.numpy()
    s, errors = block_search(block, list(x[:, None]), [(gate, 32), (up, 32)],
                             np.abs(x).reshape(-1, 32).mean(0), 16, tokens=32)
    np.testing.assert_array_equal(gate.numpy(), floats[0])        # the kernels restored
    quantized = swiglu(x, *(fake_quantized(k, s, 16) for k in floats))
    reference = swiglu(x, *floats)                                     # (N, T, D)
    relative = (quantized - reference) ** 2 / np.mean(reference ** 2, -1, keepdims=True)
    np.testing.assert_allclose(errors["block"], np.sum(relative), rtol=1e-4)
    assert errors["block"] < 0.9 * errors["block_rtn"], errors
    assert s[5] > s[4], s
