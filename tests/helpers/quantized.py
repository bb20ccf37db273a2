"""Keras' 4-bit Dense layers read back in numpy: an independent reference for what their
stored variables encode."""

from __future__ import annotations

import numpy as np


def int4_values(packed, axis: int, signed: bool):
    """Keras' 4-bit packing undone: byte k along `axis` holds values 2k (low nibble) and
    2k + 1 (high nibble); signed: two's complement in [-8, 7], else [0, 15]."""
    p = np.asarray(packed).astype(np.uint8)
    low, high = (p & 15).astype(np.int64), (p >> 4).astype(np.int64)
    if signed:
        low, high = np.where(low > 7, low - 16, low), np.where(high > 7, high - 16, high)
    shape = list(p.shape)
    shape[axis] *= 2
    return np.stack([low, high], axis + 1).reshape(shape)


def dequantized(layer):
    """(kernel (in, out), scale (in, out)): the float kernel that a Dense layer in int4,
    gptq or awq mode stores, and each weight's group scale."""
    g_idx, units = layer.g_idx.numpy().astype(np.int64), layer.units     # (in,)
    if layer.quantization_mode == "int4":          # q (in, out), scale/zero (groups, out)
        q = int4_values(layer._kernel.numpy(), 1, signed=True)[:, :units]
        scale, zero = layer.kernel_scale.numpy()[g_idx], layer.kernel_zero.numpy()[g_idx]
        return (q - zero) * scale, scale
    q = int4_values(layer.quantized_kernel.numpy(), 0, signed=False)[:units].T  # (in, out)
    scale = layer.kernel_scale.numpy()[:, g_idx].T              # (out, groups) -> (in, out)
    w = (q - layer.kernel_zero.numpy()[:, g_idx].T) * scale
    if layer.quantization_mode == "awq":
        w = w / layer.awq_scales.numpy()[:, None]
    return w, scale
