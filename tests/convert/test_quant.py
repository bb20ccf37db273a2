"""FP8 / FP4 weight formats (convert/quant.py) against transformers' own code."""

import ml_dtypes
import numpy as np
import pytest

from deepseek_tf.convert.quant import Quantization, dequantize_fp4, dequantize_fp8, \
    quantize_fp8
from deepseek_tf.errors import UserError
from tests.convert.test_fp8 import torch_fp8


def test_fp4_experts_dequantize_as_transformers_does(tmp_path):
    """V4's FP4 experts: two e2m1 values per byte, one scale per 32 inputs, given as
    E8M0 exponents (uint8 or float8_e8m0fnu) or float32."""
    torch_fp8("fp4", str(tmp_path / "fp4.npz"))
    ref = np.load(tmp_path / "fp4.npz")
    for scale, key in ((ref["exponents"], "from_exponents"),
                       (ref["exponents"].view(ml_dtypes.float8_e8m0fnu), "from_exponents"),
                       (ref["scales"], "from_scales")):
        ours = dequantize_fp4(ref["packed"], scale)
        assert ours.shape == (3, 8, 96)
        np.testing.assert_array_equal(ours, ref[key])
    with pytest.raises(UserError, match="one scale per 32"):
        dequantize_fp4(ref["packed"], ref["scales"][..., :2])


def test_fp8_round_trip_error_is_within_e4m3_precision():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 70)).astype(np.float32)  # partial blocks on both axes
    q, s = quantize_fp8(w, (16, 32))
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 3)
    back = dequantize_fp8(q, s, (16, 32))
    blockmax = np.repeat(np.repeat(s * 448, 16, 0)[:40], 32, 1)[:, :70]
    assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) / 16, blockmax * 2.0 ** -9))
    with pytest.raises(UserError, match=r"needs \[3, 3\]"):
        dequantize_fp8(q, s[:2], (16, 32), "w")


@pytest.mark.parametrize("q,needle", [
    ({"quant_method": "gptq"}, "quant_method='gptq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "give two positive integers"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt='e5m2'"),
    ({"quant_method": "fp8", "expert_dtype": "int4"}, "expert_dtype='int4'"),
])
def test_quantization_configs_we_cannot_read_are_one_line(q, needle):
    with pytest.raises(UserError, match=needle):
        Quantization.from_hf({"quantization_config": q})
    assert Quantization.from_hf({}) == Quantization()
    assert Quantization.from_hf({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}).block == (128, 128)
