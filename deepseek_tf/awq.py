"""AWQ's scale (and clipping) search on the layer output, in Keras' `awq` format.

Keras 3.15's `awq` mode picks each layer's per-input-channel scales by an
activation-weighted error of the *weights* (max|x|^2 times the weight error) and has
no clipping search. The AWQ paper (and llm-awq) choose them on the layer *output*:

  1. scales s = mean|x|^alpha (normalised by sqrt(max s * min s)), alpha on a grid in
     [0, 1]; keep the alpha minimising ||X W - (X / s) Q(diag(s) W)||^2 on the
     calibration inputs X (alpha = 0 is plain round-to-nearest, so the search never
     does worse than it on the calibration batch);
  2. clipping (off: `CLIP`): per output channel and input group, shrink the [min, max]
     range of diag(s) W by ratios in [`MIN_CLIP`, 1] and keep the ratio minimising that
     group's share of the output error; as in llm-awq, not for the projections whose
     output meets another in the attention scores (`UNCLIPPED`). It lowers the
     calibration output error further but cost the fine-tuning demo exact match
     (README "4-bit weights"), so it is off by default.

The paper shares one scale between projections reading the same input (q/kv, gate/up)
because it folds s into the preceding norm; Keras' format keeps `awq_scales` per layer
and divides the input at run time, so each layer gets its own alpha (a superset of the
shared search). The result goes into the layer's own variables (`quantized_kernel`,
`kernel_scale`, `kernel_zero`, `awq_scales`, `g_idx`): export, generate, evaluate and
the SavedModel read them as they read Keras' AWQ.

Example:
    >>> with output_error_search():
    ...     model.quantize("awq", config=awq_config)
"""

from __future__ import annotations

import contextlib

import numpy as np

#: Alphas tried: 0, 1/GRID, ..., 1.
GRID = 20
#: Clipping ratios tried: 1, ..., MIN_CLIP in CLIP_GRID steps.
MIN_CLIP, CLIP_GRID = 0.5, 20
MAXQ = 15.0  # 4 bits, unsigned with a zero point, as Keras' AWQ

#: Search the clipping too (see the module docstring).
CLIP = False
#: Layers (by name) feeding q.k: never clipped.
UNCLIPPED = ("q_proj", "k_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")

#: layer path -> the output errors `search` returned for it in the last
#: `output_error_search` (for tests and benches).
last_errors: dict = {}


def _grouped(w, group_size: int):
    """`w` (out, in) cut in groups of `group_size` inputs, (out, groups, group_size); a
    last group narrower than the others (Keras' ceil(in / group_size) groups) is padded
    with zeros, which change no range below (0 is in every one) and quantize to 0."""
    out, width = w.shape
    groups = -(-width // group_size)
    return np.pad(w, [(0, 0), (0, groups * group_size - width)]).reshape(
        out, groups, group_size)


def _ranges(w, group_size: int):
    """Per (output, group) min and max of `w` (out, in), 0 included: (out, groups) each."""
    g = _grouped(w, group_size)
    return np.minimum(g.min(-1), 0.0), np.maximum(g.max(-1), 0.0)


def _params(lo, hi):
    """Keras' asymmetric 4-bit scale and zero point of the range [lo, hi]."""
    scale = (hi - lo) / MAXQ
    scale = np.where(scale <= 0, 1e-8, scale)
    return scale.astype(np.float32), np.round(-lo / scale)


def _fake_quant(w, scale, zero, group_size: int):
    """Quantize-dequantize `w` (out, in) with per (out, group) `scale`, `zero`."""
    s, z = (np.repeat(a, group_size, axis=1)[:, :w.shape[1]] for a in (scale, zero))
    return (np.clip(np.round(w / s + z), 0, MAXQ) - z) * s


def _output_error(delta, gram):
    """||X delta^T||^2 for delta (out, in) and gram = X^T X (in, in)."""
    return float(np.sum((delta @ gram) * delta))


def search(gram, magnitude, kernel, group_size: int, clip: bool = True):
    """The output-error AWQ search of one layer.

    Args:
      gram: X^T X (in, in) of the calibration inputs X (N, in).
      magnitude: mean |X| per input channel (in,).
      kernel: the layer's kernel (in, out) float32.
      group_size: inputs per 4-bit scale (-1: the whole input).
      clip: also search the clipping (else "clipped" = "scaled").

    Returns:
      (awq_scales (in,), scaled weights (out, in), kernel_scale (out, groups),
       kernel_zero (out, groups), errors) where errors maps "rtn" (alpha = 0, no clip),
       "scaled" (best alpha) and "clipped" (best alpha and clipping) to the output error.
    """
    w = np.asarray(kernel, np.float64).T                     # (out, in)
    width = w.shape[1]
    group_size = width if group_size == -1 else group_size
    gram = np.asarray(gram, np.float64)
    magnitude = np.maximum(np.asarray(magnitude, np.float64), 1e-8)
    best, errors = None, {}
    for i in range(GRID + 1):
        s = magnitude ** (i / GRID)
        s = s / np.sqrt(s.max() * s.min())
        scaled = w * s
        q = _fake_quant(scaled, *_params(*_ranges(scaled, group_size)), group_size) / s
        err = _output_error(w - q, gram)
        if i == 0:
            errors["rtn"] = err
        if best is None or err < best[0]:
            best = (err, s)
    errors["scaled"], s = best
    scaled = w * s
    lo, hi = _ranges(scaled, group_size)
    out, groups = lo.shape
    pad = groups * group_size - width                        # the last group's padding
    gram_s = np.pad(gram / np.outer(s, s), [(0, pad), (0, pad)])   # of X / s
    blocks = np.stack([gram_s[g * group_size:(g + 1) * group_size,
                              g * group_size:(g + 1) * group_size]
                       for g in range(groups)])             # (G, g, g)
    best_err = np.full((out, groups), np.inf)
    best_lo, best_hi = lo, hi
    for ratio in np.linspace(1.0, MIN_CLIP, CLIP_GRID + 1) if clip else [1.0]:
        scale, zero = _params(lo * ratio, hi * ratio)
        d = _grouped(scaled - _fake_quant(scaled, scale, zero, group_size),
                     group_size)                            # (out, G, g)
        err = np.einsum("ogi,gij,ogj->og", d, blocks, d)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo, best_hi = (np.where(better, lo * ratio, best_lo),
                            np.where(better, hi * ratio, best_hi))
    scale, zero = _params(best_lo, best_hi)
    errors["clipped"] = _output_error(
        (scaled - _fake_quant(scaled, scale, zero, group_size)) / s, gram)
    if errors["clipped"] > errors["scaled"]:   # groups chosen alone, cross terms ignored
        scale, zero = _params(lo, hi)
        errors["clipped"] = errors["scaled"]
    return (s.astype(np.float32), scaled.astype(np.float32), scale,
            zero.astype(np.uint8), errors)


def _searching_awq_class():
    """Keras' per-layer AWQ quantizer with `search` in place of its own."""
    from keras import ops
    from keras.src import quantizers
    from keras.src.quantizers.awq import AWQ
    from keras.src.quantizers.quantizers import quantize_with_sz_map

    class OutputErrorAWQ(AWQ):
        """Sums X^T X and |X| of the calibration inputs; `quantize_layer` runs `search`."""

        def update_activation_magnitudes(self, input_batch):
            x = np.asarray(ops.convert_to_numpy(input_batch), np.float64).reshape(
                -1, self.rows)                                   # (N, in)
            if not hasattr(self, "_gram"):
                self._gram, self._abs_sum = 0.0, 0.0
            self._gram = self._gram + x.T @ x
            self._abs_sum = self._abs_sum + np.abs(x).sum(0)
            self.num_samples += len(x)

        def quantize_layer(self):
            kernel = ops.convert_to_numpy(self.layer.kernel).reshape(self.rows, self.columns)
            group_size = self.config.group_size
            s, scaled, scale, zero, errors = search(
                self._gram, self._abs_sum / self.num_samples, kernel, group_size,
                clip=CLIP and self.original_layer.name not in UNCLIPPED)
            last_errors[self.original_layer.path] = errors
            width = scaled.shape[1]
            g_idx = np.arange(width) // (width if group_size == -1 else group_size)
            q = quantize_with_sz_map(scaled, scale, zero, g_idx, MAXQ)    # (out, in)
            packed, _, _ = quantizers.pack_int4(ops.cast(q, "uint8"), axis=0, dtype="uint8")
            layer = self.original_layer
            del layer._kernel
            layer.quantized_kernel.assign(packed)
            layer.kernel_scale.assign(scale)
            layer.kernel_zero.assign(zero)
            layer.awq_scales.assign(s)
            layer.g_idx.assign(g_idx.astype(np.float32))
            layer.is_awq_calibrated = True

        def free(self):
            super().free()
            self._gram = self._abs_sum = None

    return OutputErrorAWQ


@contextlib.contextmanager
def output_error_search():
    """Within: Keras' `awq` mode quantizes each layer with `search` (each layer's
    output errors land in `last_errors`)."""
    from keras.src.quantizers import awq_core
    keras_awq = awq_core.AWQ
    awq_core.AWQ = _searching_awq_class()
    last_errors.clear()
    try:
        yield
    finally:
        awq_core.AWQ = keras_awq
