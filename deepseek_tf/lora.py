"""LoRA adapters on the model's projections, through Keras' own `Dense.enable_lora`.

Every projection of the decoder is a `keras.layers.Dense`: GQA's q/k/v/o, MLA's
low-rank `q_a_proj` / `q_b_proj` / `kv_a_proj_with_mqa` / `kv_b_proj` and `o_proj`,
the SwiGLU `gate_proj` / `up_proj` / `down_proj` of dense layers and of the MoE
layers' shared experts. `enable_lora(rank, alpha)` adds float32 `lora_kernel_a`
(in x r, he-uniform) and `lora_kernel_b` (r x out, zeros) and freezes the kernel;
the layer's `kernel` then reads `W + (alpha / r) A B`, so every path that reads
the kernel (including MLA's absorbed decode) sees the adapted weight.

The stacked routed experts (`gate_up_proj` [E, d, 2f], `down_proj` [E, f, d]) are
not Dense layers and get no adapter: `enable_lora` does not apply to them, a
per-expert adapter would need E stacked A/B pairs inside the sparse dispatch, and
with top-k routing each expert sees only ~k/E of the tokens. They stay frozen,
like the router and the norms; the shared experts and attention carry the
adaptation. With `--lora.dropout` > 0 the adapted layers compute
`x W + b + (alpha / r) dropout(x) A B` instead (the same function at inference).

On an int8 base (`--model.weight_quantization=int8`, a keep-quantized conversion) the
same `enable_lora` runs on Keras' int8 Dense: the int8 kernels and their scales stay
frozen and bitwise unchanged, the adapters train in float32 (QLoRA-style), and
`merged_model` dequantizes, adds the update and requantizes each adapted kernel with
the same per-channel scheme (Keras' `_get_kernel_with_merged_lora`).

Adapters are saved on their own (`adapter/adapter.safetensors` + `adapter_config.json`,
names like `layers_0/self_attn/q_proj/lora_kernel_a`) and merged into plain weights
for export (`merged_model`).

Example:
    >>> n = apply_lora(model, LoraConfig(rank=4, targets="q_proj,v_proj"))
    >>> plain = merged_model(model)       # a DeepSeekCausalLM without adapters
"""

from __future__ import annotations

import contextlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config import LoraConfig
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.layers.quantized import base_kernel

#: Names of the projections that can take an adapter (`--lora.targets`).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj",
           "kv_a_proj_with_mqa", "kv_b_proj", "kv_proj", "o_b_proj", "gate_proj", "up_proj",
           "down_proj")
#: Modules whose projections never take an adapter (V4's KV compressors and V3.2/V4's
#: indexers: their `kv_proj` / `gate_proj` are not the attention's or the MLP's, and the
#: indexer side sits behind a stop-gradient, trained on its own KL).
_NO_ADAPTER = ("compressor/", "indexer/")
ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _rel(path: str) -> str:
    """A variable path without the model's (instance) name."""
    return path.split("/", 1)[-1]


def target_layers(model, targets: tuple[str, ...]) -> list:
    """The Dense layers of `model` named in `targets` ("all" = every TARGETS name)."""
    names = set(TARGETS) if "all" in targets else set(targets)
    unknown = names - set(TARGETS)
    if unknown:
        raise ConfigError(f"--lora.targets: unknown name(s) {', '.join(sorted(unknown))}; "
                          f"use {', '.join(TARGETS)} or all.")
    found = [layer for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.Dense) and layer.name in names
             and not any(m in layer.path for m in _NO_ADAPTER)]
    if not found:
        raise ConfigError(f"--lora.targets={','.join(targets)} matches no projection of this "
                          f"model (e.g. MLA has no k_proj; use all).")
    return found


def _dropout_call(layer, rate: float, generator):
    """`layer.call` with dropout on the adapter's input, masks drawn from `generator`."""

    def call(inputs, training=None):
        y = tf.matmul(inputs, tf.cast(base_kernel(layer), inputs.dtype))
        if layer.bias is not None:
            y = y + tf.cast(layer.bias, y.dtype)
        x = keras.random.dropout(inputs, rate, seed=generator) if training else inputs
        a = tf.cast(layer.lora_kernel_a, x.dtype)
        b = tf.cast(layer.lora_kernel_b, x.dtype)
        y = y + (layer.lora_alpha / layer.lora_rank) * tf.matmul(tf.matmul(x, a), b)
        return layer.activation(y) if layer.activation is not None else y

    return call


def apply_lora(model, cfg: LoraConfig, seed: int = 0) -> int:
    """Adds adapters to the target projections and freezes every other weight.

    Args:
      model: a built DeepSeekCausalLM (its base weights already loaded).
      cfg: rank, alpha, dropout and targets.
      seed: seeds the adapters' A initializers (and dropout).

    Returns the number of adapted layers.
    """
    layers = target_layers(model, cfg.target_list)
    for i, layer in enumerate(layers):
        layer.enable_lora(cfg.rank, lora_alpha=cfg.alpha,
                          a_initializer=keras.initializers.HeUniform(seed=seed + i))
        if cfg.dropout > 0:  # the seed state is a layer variable: checkpointed, resumable
            layer._tracker.unlock()
            generator = keras.random.SeedGenerator(seed + i)
            layer.lora_dropout_state = generator.state  # tracked by tf.train.Checkpoint
            layer.call = _dropout_call(layer, cfg.dropout, generator)
            layer._tracker.lock()
    for v in model.variables:
        v.trainable = "lora_kernel_" in v.path
    return len(layers)


def is_lora(model) -> bool:
    return any(getattr(layer, "lora_enabled", False)
               for layer in model._flatten_layers(include_self=False))


@contextlib.contextmanager
def adapters_off(model):
    """Within: every adapted layer computes with its base kernel alone (the model before
    LoRA), e.g. GRPO's reference without a second copy. A Python switch: a function
    traced inside keeps it. Not with `--lora.dropout` > 0 (its call reads the adapter)."""
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if getattr(layer, "lora_enabled", False)]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.lora_enabled = True


def adapter_weights(model) -> dict[str, np.ndarray]:
    """{relative variable path: value} of every adapter kernel."""
    return {_rel(v.path): v.numpy() for v in model.variables if "lora_kernel_" in v.path}


def merged_model(model):
    """A plain DeepSeekCausalLM (no adapters) whose kernels are `W + (alpha / r) A B`.

    A model without adapters is returned unchanged.
    """
    if not is_lora(model):
        return model
    from deepseek_tf.model import DeepSeekCausalLM

    values = {_rel(v.path): v for v in model.variables}
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False) and layer.quantization_mode == "int8":
            # Keras: dequantize, add (alpha / r) A B, requantize (same per-channel scheme)
            kernel, scale, _ = layer._get_kernel_with_merged_lora()
            values[_rel(layer._kernel.path)] = kernel
            values[_rel(layer.kernel_scale.path)] = scale
        elif getattr(layer, "lora_enabled", False):
            values[_rel(layer._kernel.path)] = layer.kernel  # merged by Keras
    plain = DeepSeekCausalLM(model.config, dtype=model.dtype_policy)
    for v in plain.variables:
        v.assign(tf.cast(values[_rel(v.path)], v.dtype))
    return plain


def save_adapter(model, workdir: str, cfg: LoraConfig, base: str = "") -> str:
    """Writes `<workdir>/adapter/` (the adapter kernels and their config); returns it."""
    from deepseek_tf.convert.safetensors_io import write_safetensors

    out = os.path.join(workdir, ADAPTER_DIR)
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, ADAPTER_FILE), adapter_weights(model))
    meta = {**cfg.to_dict(), "base": base, "model": model.config.to_dict()}
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return out


def load_adapter(model, adapter_dir: str) -> LoraConfig:
    """Enables LoRA on `model` as `adapter_dir` describes and loads its kernels."""
    from deepseek_tf.convert.safetensors_io import SafetensorsDir

    try:
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
            meta = json.load(f)
        files = SafetensorsDir(adapter_dir)
        tensors = {k: files.load(k) for k in files.names()}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the adapter in {adapter_dir}: {e}") from e
    cfg = LoraConfig.from_dict({k: meta[k] for k in ("rank", "alpha", "dropout", "targets")})
    apply_lora(model, cfg)
    by_path = {_rel(v.path): v for v in model.variables if "lora_kernel_" in v.path}
    if set(by_path) != set(tensors):
        missing = sorted(set(by_path) ^ set(tensors))[:3]
        raise UserError(f"the adapter in {adapter_dir} does not fit this model "
                        f"(e.g. {', '.join(missing)}).")
    for k, v in by_path.items():
        if tuple(v.shape) != tensors[k].shape:
            raise UserError(f"adapter tensor {k} has shape {tensors[k].shape}, the model "
                            f"needs {tuple(v.shape)}.")
        v.assign(tensors[k])
    return cfg
