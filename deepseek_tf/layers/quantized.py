"""Int8 weight-only storage of the projections and routed experts (keep-quantized runs).

With `ModelConfig.weight_quantization = "int8"` every projection kernel is held as
int8 plus a float32 scale per output channel (per expert and output channel for the
stacked routed experts), and dequantized on the fly inside the matmul: 1 byte per
weight instead of 4 (bf16: 2). The activations stay float (weight-only: no activation
quantization, so the only error is the weights' rounding).

- Projections (`keras.layers.Dense`) use Keras 3's own int8 mode: `Dense.quantize
  ("int8")` with `Int8QuantizationConfig(activation_quantizer=None)`, i.e. a `kernel`
  int8 [in, out] and `kernel_scale` [out]; Keras' `_int8_call` computes
  `x @ cast(kernel) / kernel_scale` with a custom gradient (so LoRA's `enable_lora`
  trains adapters on top, and `_get_kernel_with_merged_lora` dequantizes, merges and
  requantizes). `lm_head` and the DSA indexer's float32 `weights_proj` stay float, as
  DeepSeek's releases keep their head unquantized.
- The routed experts' stacks (`DeepSeekMoE.gate_up_proj` [E, d, 2f], `down_proj`
  [E, f, d]) are our own weights: int8 with `<name>_scale` [E, out], dequantized per
  layer call.

One scheme everywhere (Keras' `abs_max_quantize` over the contracted axis -2):
`scale = 127 / max|w|`, `q = round(w * scale)`, `w ~ q / scale`.

Example:
    >>> q, s = quantize_int8(np.ones((4, 3), np.float32))     # (4, 3) int8, (3,) scale
    >>> dequantize_int8(q, s).shape
    (4, 3)
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

INT8 = "int8"
#: The values of `--model.weight_quantization`.
MODES = ("none", INT8)
#: Dense layers that keep float kernels in a quantized model: the output head and the
#: DSA indexer's head weights (built in float32 on purpose).
FLOAT_LAYERS = ("lm_head", "weights_proj")


def int8_config():
    """Keras' weight-only int8 config: per-output-channel abs-max, float activations."""
    from keras.src.quantizers import AbsMaxQuantizer
    from keras.src.quantizers.quantization_config import Int8QuantizationConfig
    return Int8QuantizationConfig(weight_quantizer=AbsMaxQuantizer(axis=0),
                                  activation_quantizer=None)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) of `w` [..., in, out], one scale per output (axis -2
    reduced): Keras' `abs_max_quantize`, the scheme `Dense.quantize("int8")` uses."""
    from keras.src.quantizers import abs_max_quantize
    q, scale = abs_max_quantize(np.asarray(w, np.float32), axis=-2, to_numpy=True)
    return np.asarray(q, np.int8), np.squeeze(np.asarray(scale, np.float32), axis=-2)


def dequantize_int8(q, scale) -> np.ndarray:
    """float32 `q / scale` of `quantize_int8`'s pair (scale [..., out])."""
    return np.asarray(q, np.float32) / np.expand_dims(np.asarray(scale, np.float32), -2)


def _int8_targets(model) -> list:
    """The Dense layers `weight_quantization="int8"` stores as int8 (the projections)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.Dense) and layer.name not in FLOAT_LAYERS]


def declare_int8(model) -> int:
    """Replaces the float kernel of each `quantized_dense_layers` layer by Keras' int8
    kernel + scale (zeros / ones: a checkpoint restore or a conversion fills them; the
    float values are dropped, not quantized). Returns the number of layers."""
    from keras.src import dtype_policies

    layers = _int8_targets(model)
    for layer in layers:
        shape = tuple(layer._kernel.shape)
        layer._tracker.unlock()
        try:
            # `del layer._kernel` without Keras' gc.collect() per variable (~0.5 s each)
            layer._untrack_variable(layer._kernel)
            super(keras.layers.Layer, layer).__delattr__("_kernel")
            layer.quantization_config = int8_config()
            layer.quantized_build(shape, INT8, layer.quantization_config)
        finally:
            layer._tracker.lock()
        layer.dtype_policy = dtype_policies.get(f"{INT8}_from_{layer.dtype_policy.name}")
    return len(layers)


def base_kernel(layer):
    """A Dense layer's float kernel without LoRA (dequantized if it is int8)."""
    if layer.quantization_mode == INT8:
        return tf.cast(layer._kernel, layer.compute_dtype) / tf.cast(layer.kernel_scale,
                                                                      layer.compute_dtype)
    return layer._kernel


def float_kernel(layer):
    """A Dense layer's float kernel as its call uses it (int8 dequantized, LoRA added),
    for code that reads the weight itself (MLA's absorbed attention)."""
    if layer.quantization_mode != INT8:
        return layer.kernel
    w = base_kernel(layer)
    if layer.lora_enabled:
        a = tf.cast(layer.lora_kernel_a, w.dtype)
        w = w + (layer.lora_alpha / layer.lora_rank) * tf.matmul(a, tf.cast(
            layer.lora_kernel_b, w.dtype))
    return w


def scale_variables(model) -> dict:
    """{id(int8 variable): its float32 scale variable} of every quantized weight."""
    out = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Dense) and layer.quantization_mode == INT8:
            out[id(layer._kernel)] = layer.kernel_scale
        for name in getattr(layer, "int8_weights", ()):
            out[id(getattr(layer, name))] = getattr(layer, name + "_scale")
    return out
