"""GPTQ's error feedback with the Cholesky factor of the inverse Hessian, in Keras' `gptq`
format.

GPTQ quantizes a layer's input columns one after the other and spreads each column's
rounding error over the columns not yet quantized, optimally for the calibration inputs
X (H = 2 X^T X). The optimal spread uses the inverse Hessian *of the remaining columns*,
which changes after every column; the GPTQ paper (and AutoGPTQ, GPTQModel) reads all of
them off one upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U, divided by
U[i, i], is column i's update given that columns 0..i-1 are fixed. Keras 3.15's GPTQ
(`keras.src.quantizers.gptq`) indexes the rows of the dense H^-1 instead, which is right
for the first column only (keras-team/keras#23481 fixed it after 3.15). Within
`cholesky_updates` Keras' `gptq` mode runs its own column loop (`gptq_quantize_matrix`,
the same groups, damping and activation order) on U computed in float64, and stores the
result in the layer's variables as Keras' GPTQ does.

Example:
    >>> with cholesky_updates():
    ...     model.quantize("gptq", config=gptq_config)
"""

from __future__ import annotations

import contextlib

import numpy as np


def inverse_hessian_factor(hessian, damping: float, activation_order: bool):
    """The upper Cholesky factor U of the damped inverse Hessian, in quantization order.

    Args:
      hessian: H (in, in) of the calibration inputs.
      damping: added to the diagonal, times its mean (Keras' `hessian_damping`); a dead
        input (zero diagonal) gets 1 first, as in Keras.
      activation_order: quantize the inputs with the largest diagonal first.

    Returns:
      (U (in, in) float64 with U^T U = H^-1 of the permuted H, the permutation (in,)).
    """
    h = np.array(hessian, np.float64)
    diagonal = np.diag(h).copy()
    diagonal[diagonal == 0] = 1.0
    diagonal += damping * diagonal.mean()
    np.fill_diagonal(h, diagonal)
    perm = (np.argsort(-diagonal, kind="stable") if activation_order
            else np.arange(len(diagonal)))
    h = h[perm][:, perm]
    return np.linalg.cholesky(np.linalg.inv(h)).T, perm


def _cholesky_gptq_class():
    """Keras' per-layer GPTQ with `inverse_hessian_factor` in place of the dense inverse."""
    from keras import ops
    from keras.src import quantizers
    from keras.src.quantizers.gptq import GPTQ, gptq_quantize_matrix

    class CholeskyGPTQ(GPTQ):
        """`quantize_and_correct_layer` runs Keras' column loop on U, in U's order."""

        def quantize_and_correct_layer(self, blocksize=128):
            u, perm = inverse_hessian_factor(ops.convert_to_numpy(self.hessian),
                                             self.config.hessian_damping,
                                             self.config.activation_order)
            weights = ops.convert_to_numpy(self.layer.kernel).T[:, perm]   # (out, in)
            quantized, scale, zero, g_idx = gptq_quantize_matrix(
                ops.convert_to_tensor(weights, "float32"),
                inv_hessian=ops.convert_to_tensor(u, "float32"), blocksize=blocksize,
                group_size=self.config.group_size, activation_order=False,
                compute_scale_zero=self.quantizer.find_params)
            inverse = np.argsort(perm)
            quantized = np.asarray(ops.convert_to_numpy(quantized))[:, inverse]
            g_idx = np.asarray(ops.convert_to_numpy(g_idx))[inverse]
            layer = self.original_layer
            quantized = quantized.astype(layer.quantized_kernel.dtype)
            if self.config.weight_bits == 4:
                quantized, _, _ = quantizers.pack_int4(quantized, axis=0, dtype="uint8")
            del layer._kernel
            layer.quantized_kernel.assign(quantized)
            layer.kernel_scale.assign(scale)
            layer.kernel_zero.assign(zero)
            layer.g_idx.assign(g_idx)
            layer.is_gptq_calibrated = True

    return CholeskyGPTQ


@contextlib.contextmanager
def cholesky_updates():
    """Within: Keras' `gptq` mode spreads rounding errors with `inverse_hessian_factor`."""
    from keras.src.quantizers import gptq_core
    keras_gptq = gptq_core.GPTQ
    gptq_core.GPTQ = _cholesky_gptq_class()
    try:
        yield
    finally:
        gptq_core.GPTQ = keras_gptq
