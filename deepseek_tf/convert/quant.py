"""DeepSeek's released weight formats: block-scaled FP8 and FP4-packed experts (numpy).

FP8 (V3, R1, V3.1, V3.2): a 2-D projection weight `W` [out, in] is stored as
float8_e4m3fn with a float32 `<name>_scale_inv` (`weight_scale_inv`) of shape
[ceil(out / 128), ceil(in / 128)]; the real weight is `fp8 value x its block's
scale` (the name says "inverse" because it undoes the quantizer's division).
`config.json` says so with `quantization_config = {quant_method: fp8,
weight_block_size: [128, 128], ...}`; embeddings, norms, the router and lm_head
stay bf16.

FP4 (V4 / V4.1 routed experts, `quantization_config.expert_dtype = "fp4"`): a weight
[out, in] is stored as int8 [out, in / 2], two e2m1 values per byte (low nibble
first), with one scale per 32 inputs, [out, in / 32], as float8_e8m0fnu (a power of
two), uint8 (its biased exponent) or float32.

Example:
    >>> q, s = quantize_fp8(w, (128, 128))
    >>> np.abs(dequantize_fp8(q, s, (128, 128)) - w).max() <= np.abs(w).max() / 16
    True
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from deepseek_tf.errors import UserError

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
FP4_GROUP = 32
SCALE_SUFFIX = "_scale_inv"


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a checkpoint's weights are stored (`config.json`'s quantization_config).

    method: "" (plain bf16/fp16/fp32 tensors) or "fp8".
    block: the FP8 weight block [rows, cols].
    expert_dtype: "fp8" or "fp4" (V4's routed experts).
    """
    method: str = ""
    block: tuple[int, int] = (128, 128)
    expert_dtype: str = "fp8"

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "Quantization":
        q = hf.get("quantization_config")
        if not q:
            return cls()
        method = q.get("quant_method")
        if method != "fp8":
            raise UserError(f"{where}: quantization_config.quant_method={method!r} is not "
                            f"supported (fp8 block-scaled, as DeepSeek releases, is); "
                            f"dequantize the checkpoint first.")
        block = q.get("weight_block_size") or [128, 128]
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise UserError(f"{where}: quantization_config.weight_block_size={block!r}: "
                            f"give two positive integers, e.g. [128, 128].")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UserError(f"{where}: quantization_config.fmt={fmt!r} is not supported "
                            f"(e4m3 is).")
        expert = q.get("expert_dtype", "fp8")
        if expert not in ("fp8", "fp4"):
            raise UserError(f"{where}: quantization_config.expert_dtype={expert!r}: fp8 or "
                            f"fp4.")
        return cls("fp8", (int(block[0]), int(block[1])), expert)

    def to_hf(self) -> dict:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.block)}


def scale_shape(shape, block) -> tuple[int, int]:
    """The `weight_scale_inv` shape of a [rows, cols] weight: ceil-divided by `block`."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _expand(scale: np.ndarray, shape, block) -> np.ndarray:
    """A per-block [R, C] array repeated to the weight's [rows, cols]."""
    return np.repeat(np.repeat(scale, block[0], 0)[:shape[0]], block[1], 1)[:, :shape[1]]


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block, name: str = "weight"
                   ) -> np.ndarray:
    """float32 `weight x its block's scale_inv` of a float8 [rows, cols] weight.

    A scale whose shape does not fit the weight and block is a UserError naming `name`.
    """
    want = scale_shape(weight.shape, block)
    if weight.ndim != 2 or tuple(scale_inv.shape) != want:
        raise UserError(f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, but a "
                        f"{list(weight.shape)} weight with weight_block_size {list(block)} "
                        f"needs {list(want)}: the checkpoint or its quantization_config is "
                        f"inconsistent.")
    out = weight.astype(np.float32)
    out *= _expand(scale_inv.astype(np.float32), weight.shape, block)
    return out


def quantize_fp8(weight: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weight, float32 scale_inv) of a [rows, cols] float weight, with one
    scale per block (its max |w| / 448), as DeepSeek's release quantizes."""
    w = np.asarray(weight, np.float32)
    rows, cols = w.shape
    r, c = scale_shape(w.shape, block)
    padded = np.zeros((r * block[0], c * block[1]), np.float32)
    padded[:rows, :cols] = np.abs(w)
    amax = padded.reshape(r, block[0], c, block[1]).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = np.clip(w / _expand(scale, w.shape, block), -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def _scales_float(scale: np.ndarray) -> np.ndarray:
    if scale.dtype == np.uint8:  # E8M0 stored as its biased exponent byte
        return np.exp2(scale.astype(np.float32) - 127.0)
    return scale.astype(np.float32)


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray, name: str = "weight") -> np.ndarray:
    """float32 [..., out, in] of an FP4-packed weight ([..., out, in / 2] int8/uint8, two
    e2m1 values per byte, low nibble first) and its per-32-inputs scale [..., out, in / 32]
    (float8_e8m0fnu, uint8 exponent or float32)."""
    u8 = np.ascontiguousarray(packed).view(np.uint8)
    values = np.stack([FP4_VALUES[u8 & 0xF], FP4_VALUES[u8 >> 4]], axis=-1)
    values = values.reshape(*u8.shape[:-1], 2 * u8.shape[-1])
    if scale.shape[:-1] != values.shape[:-1] or values.shape[-1] != FP4_GROUP * scale.shape[-1]:
        raise UserError(f"{name}{SCALE_SUFFIX} has shape {list(scale.shape)}, but an FP4 "
                        f"weight of {list(values.shape)} values needs one scale per "
                        f"{FP4_GROUP}: {list(values.shape[:-1]) + [values.shape[-1] // 32]}.")
    return values * np.repeat(_scales_float(scale), FP4_GROUP, axis=-1)
