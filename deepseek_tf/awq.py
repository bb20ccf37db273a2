"""AWQ's scale (and clipping) search on the output, in Keras' `awq` format.

Keras 3.15's `awq` mode picks each layer's per-input-channel scales by an
activation-weighted error of the *weights* (max|x|^2 times the weight error) and has
no clipping search. The AWQ paper (and llm-awq, AutoAWQ) choose them on the output:

  1. scales s = mean|x|^alpha (normalised by sqrt(max s * min s)), alpha on a grid in
     [0, 1] (alpha = 0 is plain round-to-nearest, so the search never does worse than
     it on the calibration batch), chosen by `block_search` on the *decoder block's*
     output with the rest of the block in float, each token's error taken relative to
     its output's scale; projections that read the same input
     (q/k/v after the input norm, gate/up after the post-attention norm) share one: a
     layer's own output error misses how its error spreads through q.k^T and softmax
     or SiLU(gate) * up. On the tiny preset, one alpha per layer chosen on the
     layer's own output raised the validation loss 0.0037 above int4's; the shared
     block search ends level with it (README "4-bit weights"). With the plain squared
     error (before 2026-12-05) the few tokens with massive activations chose alpha: on
     the fine-tuning demo AWQ ended further from float than round-to-nearest.
  2. clipping (off: `CLIP`): per output channel and input group, shrink the [min, max]
     range of diag(s) W by ratios in [`MIN_CLIP`, 1] and keep the ratio minimising that
     group's share of the layer's output error; as in llm-awq, not for the projections
     whose output meets another in the attention scores (`UNCLIPPED`). It lowers the
     calibration output error further but cost the fine-tuning demo exact match and
     raised the tiny preset's validation loss, so it is off by default.

Keras' format keeps `awq_scales` per layer and divides the input at run time (the
paper folds them into the norm before). The result goes into the layer's own variables
(`quantized_kernel`, `kernel_scale`, `kernel_zero`, `awq_scales`, `g_idx`): export,
generate, evaluate and the SavedModel read them as they read Keras' AWQ.

Example:
    >>> with output_error_search(calibration_blocks):
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


def candidate_scales(magnitude):
    """AWQ's per-input-channel scales for alpha = 0, 1/GRID, ..., 1: mean|x|^alpha
    normalised by sqrt(max * min), each (in,) float64."""
    magnitude = np.maximum(np.asarray(magnitude, np.float64), 1e-8)
    for i in range(GRID + 1):
        s = magnitude ** (i / GRID)
        yield s / np.sqrt(s.max() * s.min())


def fake_quantized(kernel, s, group_size: int):
    """What AWQ serves for `kernel` (in, out) with scales `s` (in,), as float (in, out):
    round-to-nearest 4 bits of diag(s) W in groups of `group_size` inputs, over s."""
    w = np.asarray(kernel, np.float64).T                     # (out, in)
    group_size = w.shape[1] if group_size == -1 else group_size
    scaled = w * s
    return (_fake_quant(scaled, *_params(*_ranges(scaled, group_size)), group_size) / s).T


def search(gram, magnitude, kernel, group_size: int, clip: bool = True, scales=None):
    """The output-error AWQ search of one layer.

    Args:
      gram: X^T X (in, in) of the calibration inputs X (N, in).
      magnitude: mean |X| per input channel (in,).
      kernel: the layer's kernel (in, out) float32.
      group_size: inputs per 4-bit scale (-1: the whole input).
      clip: also search the clipping (else "clipped" = "scaled").
      scales: (in,) the scales to use (chosen elsewhere, e.g. by `block_search`)
        instead of searching alpha on this layer's output.

    Returns:
      (awq_scales (in,), scaled weights (out, in), kernel_scale (out, groups),
       kernel_zero (out, groups), errors) where errors maps "rtn" (alpha = 0, no clip),
       "scaled" (the scales used) and "clipped" (those and clipping) to the output error.
    """
    kernel = np.asarray(kernel, np.float64)                  # (in, out)
    w, width = kernel.T, kernel.shape[0]                     # (out, in)
    gram = np.asarray(gram, np.float64)

    def error(s):
        return _output_error((kernel - fake_quantized(kernel, s, group_size)).T, gram)
    errors = {"rtn": error(np.ones(width))}
    tried = candidate_scales(magnitude) if scales is None else [np.asarray(scales, np.float64)]
    errors["scaled"], _, s = min(((error(s), i, s) for i, s in enumerate(tried)),
                                 key=lambda e: e[:2])
    group_size = width if group_size == -1 else group_size
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


def block_search(block, inputs, kernels, magnitude, group_size: int, tokens: int = 8192):
    """One alpha for projections that read the same input, chosen on the block output.

    As llm-awq does for q/k/v and for gate/up: one set of scales for the group (they
    could then fold into the norm before it), the alpha whose fake-quantized group gives
    the least error at the output of `block` on `inputs`, with the rest of the block in
    float. A layer's own output error misses how its error spreads: through q.k^T and
    softmax, through SiLU(gate) * up. The error is each token's squared error relative
    to the mean square of its float output, summed: whatever reads the residual stream
    reads it through an RMSNorm (the next block's, the final one), blind to a token's
    scale. The plain squared error is ruled by the few tokens with massive activations
    (a document's first tokens: on the fine-tuning demo's last block |h| reaches 9,780
    against a median of 300), whose relative error is small.

    Args:
      block: callable, block inputs (B, T, ...) -> outputs (B, T, D) (or a tuple led by
        them); it reads the kernels at call time.
      inputs: the calibration inputs of the block, a list of (1, T, ...).
      kernels: [(variable, rows)]: the group's float kernels, each seen as (rows, out).
      magnitude: mean |x| per channel of the input the group reads (rows,).
      group_size: inputs per 4-bit scale (-1: the whole input).
      tokens: tokens per block call (whole windows, at least one).

    Returns:
      (scales (rows,), {"block_rtn": block-output error at alpha 0, "block": at the best})
    """
    x = np.concatenate([np.asarray(i) for i in inputs])           # (N, T, ...)
    chunk = max(1, tokens // x.shape[1])
    floats = [v.numpy() for v, _ in kernels]

    def outputs():
        out = [block(x[i:i + chunk]) for i in range(0, len(x), chunk)]
        return [np.asarray(o[0] if isinstance(o, (tuple, list)) else o, np.float64)
                for o in out]                                     # each (chunk, T, D)
    reference, tried = outputs(), []
    weights = [1.0 / np.maximum(np.mean(r ** 2, -1, keepdims=True), 1e-12)
               for r in reference]                                # (chunk, T, 1)
    try:
        for i, s in enumerate(candidate_scales(magnitude)):
            for (v, rows), k in zip(kernels, floats):
                v.assign(fake_quantized(k.reshape(rows, -1), s, group_size)
                         .reshape(k.shape).astype(k.dtype))
            err = sum(float(np.sum(w * (o - r) ** 2))
                      for o, r, w in zip(outputs(), reference, weights))
            tried.append((err, i, s))
    finally:
        for (v, _), k in zip(kernels, floats):
            v.assign(k)
    best = min(tried, key=lambda e: e[:2])
    return best[2], {"block_rtn": tried[0][0], "block": best[0]}


def _searching_awq_class(block_of):
    """Keras' per-layer AWQ quantizer with `search` in place of its own; layers in
    `block_of` (id(layer) -> its calibration block, which keeps its inputs in
    `recorded`) get their scales from `block_search` over the projections of that
    block that read the same input."""
    from keras import ops
    from keras.src import quantizers
    from keras.src.quantizers.awq import AWQ
    from keras.src.quantizers.quantizers import quantize_with_sz_map

    of_block = {}                              # id(block) -> its OutputErrorAWQ objects

    class OutputErrorAWQ(AWQ):
        """Sums X^T X and |X| of the calibration inputs; `quantize_layer` runs `search`."""

        def __init__(self, layer, config=None):
            super().__init__(layer, config)
            self.block, self.scales = block_of.get(id(layer)), None
            if self.block is not None:
                of_block.setdefault(id(self.block), []).append(self)

        def _share_scales(self):
            """Groups the block's layers by their input (equal sums: the same tensor)
            and gives each group the scales of `block_search`."""
            groups = {}
            for obj in of_block.pop(id(self.block)):
                key = (obj.rows, obj._abs_sum.tobytes(), obj._gram.tobytes())
                groups.setdefault(key, []).append(obj)
            inputs, self.block.recorded = self.block.recorded, None
            for group in groups.values():
                s, errors = block_search(
                    self.block.hidden, inputs,
                    [(g.original_layer._kernel, g.rows) for g in group],
                    group[0]._abs_sum / group[0].num_samples, self.config.group_size)
                for g in group:
                    g.scales = s
                    last_errors[g.original_layer.path] = dict(errors)

        def update_activation_magnitudes(self, input_batch):
            x = np.asarray(ops.convert_to_numpy(input_batch), np.float64).reshape(
                -1, self.rows)                                   # (N, in)
            if not hasattr(self, "_gram"):
                self._gram, self._abs_sum = 0.0, 0.0
            self._gram = self._gram + x.T @ x
            self._abs_sum = self._abs_sum + np.abs(x).sum(0)
            self.num_samples += len(x)

        def quantize_layer(self):
            if self.block is not None and id(self.block) in of_block:
                self._share_scales()                # the block's first layer: all groups
            kernel = ops.convert_to_numpy(self.layer.kernel).reshape(self.rows, self.columns)
            group_size = self.config.group_size
            s, scaled, scale, zero, errors = search(
                self._gram, self._abs_sum / self.num_samples, kernel, group_size,
                clip=CLIP and self.original_layer.name not in UNCLIPPED, scales=self.scales)
            last_errors.setdefault(self.original_layer.path, {}).update(errors)
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
def output_error_search(blocks=()):
    """Within: Keras' `awq` mode quantizes each layer with `search` (each layer's
    output errors land in `last_errors`); the layers inside `blocks` (Keras' walk's
    sequential blocks, each with `inner` the decoder block, `hidden` its inputs ->
    the decoder block's outputs (B, T, D), and `recorded`, set to a list here,
    collecting its inputs while not None) take their scales from `block_search`."""
    from keras.src.quantizers import awq_core
    keras_awq = awq_core.AWQ
    block_of = {id(x): b for b in blocks for x in b.inner._flatten_layers()}
    for b in blocks:
        b.recorded = []                  # until its search takes them
    awq_core.AWQ = _searching_awq_class(block_of)
    last_errors.clear()
    try:
        yield
    finally:
        awq_core.AWQ = keras_awq
