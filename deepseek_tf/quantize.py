"""Keras' own weight quantization of a loaded model for the SavedModel export.

Modes: int8 (per-channel), int4 (round-to-nearest, one scale per `group_size` inputs;
where `group_size` does not divide a layer's input width, its last group is narrower),
gptq and awq (4-bit, the same groups, calibrated with Keras' `GPTQConfig` / `AWQConfig`
on token windows walked through the decoder blocks one after the other, packed as
training packs them (each document attends only to itself, from position 0); awq's
per-channel scales are searched on each decoder block's output by `deepseek_tf.awq`,
not by Keras' weight-error search).
GPTQ quantizes the columns in activation order (largest Hessian diagonal first; on the
fine-tuning demo it is as good or better than Keras' default order and varies less
with the calibration set), with Keras' damping (0.01 of the mean diagonal) and the
GPTQ paper's error feedback (`deepseek_tf.gptq`; Keras 3.15's is right for the first
column only). Both calibrate on exactly the windows given (Keras re-cuts them at an
offset that changes from process to process).

Kept in float in every mode: MLA's `kv_b_proj` (the absorbed decode folds its kernel
into the query; it is small), a tied embedding (it doubles as the output head), norms,
routers and the stacked MoE expert weights (our own (E, D, F) variables, not Keras
Dense layers; Keras has no quantizer for them). GPTQ/AWQ calibrate the projections
inside the decoder blocks. The untied output head and the embedding, outside the
blocks, get `head` in the 4-bit modes: int8 per channel by default (with plain int4
there the fine-tuning demo lost 1.5 to 4 points under GPTQ/AWQ, with int8 at most 1), float
(`none`, what AutoGPTQ, AutoAWQ and llm-compressor do: they quantize only the
projections inside the blocks) or int4.

`quantize_run` is the entry point of export, generate and evaluate (`--quantize`).

Example:
    >>> quantize_weights(model, "gptq", group_size=64, calibration=windows)
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np

from deepseek_tf.awq import output_error_search
from deepseek_tf.calibration import as_windows, calibration_windows
from deepseek_tf.errors import UserError
from deepseek_tf.gptq import cholesky_updates
from deepseek_tf.workdir_files import prepared_data_dir

MODES = ("none", "int8", "int4", "gptq", "awq")
#: What the 4-bit modes do with the layers outside the decoder blocks (the untied output
#: head and the embedding): int4 like the blocks, int8 per channel, or none (float).
HEAD_MODES = ("none", "int8", "int4")
HEAD_DEFAULT = "int8"


def _kept(model):
    """Layer filter: True for the layers Keras may quantize (see the module docstring)."""
    keep = {id(model.embed_tokens)} if model.lm_head is None else set()

    def wanted(layer):  # a keep-quantized workdir's int8 layers stay as they are
        return id(layer) not in keep and layer.name != "kv_b_proj" and \
            getattr(layer, "quantization_mode", None) is None
    return wanted


#: Keras 3.15's GPTQ works through a kernel's inputs in blocks of this many and, with
#: `group_size=-1`, makes one scale per block instead of one per output channel: the
#: scale variable then refuses the result for wider inputs.
GPTQ_BLOCK = 128


def _check_group_size(model, wanted, mode: str, group_size: int) -> None:
    """GPTQ with one scale per channel (-1) only takes inputs up to `GPTQ_BLOCK` wide.
    Any positive group size suits every width: Keras makes ceil(width / group_size)
    groups, the last one narrower where `group_size` does not divide the width."""
    import keras
    if mode != "gptq" or group_size != -1:
        return
    for layer in model._flatten_layers():
        if not wanted(layer) or not isinstance(layer, (keras.layers.Dense,
                                                        keras.layers.EinsumDense)):
            continue
        width = int(layer.kernel.shape[0])
        if width > GPTQ_BLOCK:
            raise UserError(f"--quantize=gptq --group_size=-1: Keras' GPTQ makes one scale "
                            f"per {GPTQ_BLOCK} inputs, not per channel, and layer "
                            f"{layer.path} has {width}; give a positive group size "
                            f"(e.g. 128 or 32).")


#: Channels appended to the hidden states of Keras' calibration walk: segment id, position.
EXTRA = 2


def _calibration_layers(model) -> tuple:
    """(embedding, blocks): the layers Keras' GPTQ/AWQ walk calls, one window at a time.

    As in training, a window holds several documents, each attending only to itself
    with positions restarting at 0 (data/pipeline.py's packing); the walk passes one
    tensor from layer to layer, so the embedding takes a (3, T) window (tokens, segment
    ids, positions) and appends the last two to its (1, T, D) output as float channels,
    and each block, (1, T, D + 2) in and out, builds its mask and positions from them.
    (Before, every window was one causal stream from position 0: a document saw the
    ones before it, which neither training nor generation ever shows the model.)"""
    import keras
    import tensorflow as tf

    from deepseek_tf.layers.attention import attention_mask

    class CalibrationEmbedding(keras.layers.Layer):
        def __init__(self, inner):
            super().__init__(name="calibrate_embedding")
            self.inner = inner

        def call(self, window):                                 # (3, T) int32
            x = tf.cast(self.inner(window[:1]), tf.float32)     # (1, T, D)
            extra = tf.cast(tf.transpose(window[1:])[None], tf.float32)   # (1, T, 2)
            return tf.concat([x, extra], -1)

    class CalibrationBlock(keras.layers.Layer):
        def __init__(self, inner):
            super().__init__(name=f"calibrate_{inner.name}")
            self.inner = inner
            self.recorded = None      # a list: its inputs (AWQ's block search)

        def hidden(self, x):
            """(B, T, D + 2) -> the decoder block's float32 output (B, T, D)."""
            segments = tf.cast(x[..., -EXTRA], tf.int32)        # (B, T)
            positions = tf.cast(x[..., -EXTRA + 1], tf.int32)   # (B, T)
            h = tf.cast(x[..., :-EXTRA], self.inner.compute_dtype)
            out = self.inner(h, positions=positions, attention_mask=attention_mask(segments))
            return tf.cast(out, tf.float32)

        def call(self, x):                                      # (B, T, D + 2)
            if self.recorded is not None:
                self.recorded.append(x)
            return tf.concat([self.hidden(x), x[..., -EXTRA:]], -1)

    return CalibrationEmbedding(model.embed_tokens), [CalibrationBlock(b) for b in model.blocks]


@contextlib.contextmanager
def _calibration_hooks_reachable(layers):
    """Keras 3.15's GPTQ/AWQ walks record each layer's inputs by patching `layer.call`,
    but a layer in gptq/awq mode is called through `quantized_call`, which never
    reaches `call`: the Hessians / activation statistics stay empty and both degrade
    to round-to-nearest. Until a layer is calibrated, `call` (float kernel, the same
    output) is routed to, so the patches see the inputs."""
    for layer in layers:
        def routed(*args, _layer=layer, _quantized=layer.quantized_call, **kwargs):
            if getattr(_layer, "is_gptq_calibrated", False) or \
                    getattr(_layer, "is_awq_calibrated", False):
                return _quantized(*args, **kwargs)
            return _layer.call(*args, **kwargs)
        object.__setattr__(layer, "quantized_call", routed)
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "quantized_call")


@contextlib.contextmanager
def _windows_as_given():
    """Keras 3.15's GPTQ/AWQ cut their calibration windows anew from the concatenated
    dataset at an offset drawn from `hash(("gptq-calib", seed))`, which differs from
    process to process (Python's string hashing is salted): the same command calibrated
    on different windows each run. Within: both take the given windows as they are."""
    from keras.src.quantizers import awq_core, gptq_core

    def given(tokenizer, sequence_length, dataset, num_samples=128, **_):
        return np.asarray(dataset, np.int32)[:num_samples]    # (N, 3, T), see Windows
    kept = gptq_core.get_dataloader, awq_core.get_dataloader
    gptq_core.get_dataloader = awq_core.get_dataloader = given
    try:
        yield
    finally:
        gptq_core.get_dataloader, awq_core.get_dataloader = kept


@contextlib.contextmanager
def _no_progress_bar():
    """Keras' GPTQ/AWQ print a progress bar per model; the export logs one line."""
    import keras
    was = keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()
    try:
        yield
    finally:
        if was:
            keras.utils.enable_interactive_logging()


class _TokenIds:
    """Keras' GPTQ/AWQ configs want a tokenizer; the dataset is already token ids."""

    def tokenize(self, ids):
        return np.asarray(ids, np.int32)


def quantize_weights(model, mode: str, group_size: int = 128, calibration=None,
                     tokenizer=None, head: str = HEAD_DEFAULT) -> None:
    """Quantizes `model`'s weights in place with Keras (see the module docstring).

    Args:
      model: a built `DeepSeekCausalLM`.
      mode: one of `MODES`.
      group_size: 4-bit modes: inputs per scale (-1 = one scale per output channel).
      calibration: gptq/awq: `Windows` (`calibration_windows`), or int32 token windows
        (N, T), each one document.
      tokenizer: passed on to Keras' configs, which insist on one; they never call it on
        token windows (None: an identity stand-in).
      head: 4-bit modes: what the layers outside the decoder blocks (the untied output
        head, the embedding) get, one of `HEAD_MODES`.
    """
    import keras
    if mode not in MODES:
        raise UserError(f"--quantize={mode!r}: the SavedModel takes {', '.join(MODES)}.")
    if mode == "none":
        return
    if mode in ("gptq", "awq") and (calibration is None or
                                    len(as_windows(calibration).tokens) == 0):
        raise UserError(f"--quantize={mode} needs calibration data: pass --calibration_data "
                        f"(a JSONL/text file or a prepared data dir) or train on prepared data.")
    if group_size == 0 or group_size < -1:
        raise UserError(f"--group_size={group_size}: a positive integer or -1.")
    if head not in HEAD_MODES:
        raise UserError(f"--quantize_head={head!r}: one of {', '.join(HEAD_MODES)}.")
    wanted = _kept(model)
    if mode != "int8":
        _check_group_size(model, wanted, mode, group_size)
    with warnings.catch_warnings(), _no_progress_bar():
        warnings.simplefilter("ignore")  # "Layer RMSNorm does not have a quantize method"
        if mode == "int8":
            model.quantize("int8", filters=wanted)
            return
        inside = {id(x) for b in model.blocks for x in b._flatten_layers() if wanted(x)}
        if mode in ("gptq", "awq"):
            windows = np.stack(as_windows(calibration), 1)          # (N, 3, T)
            embedding, blocks = _calibration_layers(model)
            structure = {"pre_block_layers": [embedding], "sequential_blocks": blocks}
            options = dict(dataset=list(windows), tokenizer=tokenizer or _TokenIds(), weight_bits=4,
                           num_samples=len(windows), sequence_length=windows.shape[2],
                           group_size=group_size, quantization_layer_structure=structure)
            config = (keras.quantizers.GPTQConfig(**options, activation_order=True)
                      if mode == "gptq" else keras.quantizers.AWQConfig(**options))
            targets = [x for b in model.blocks for x in b._flatten_layers() if id(x) in inside]
            search = output_error_search(blocks) if mode == "awq" else cholesky_updates()
            try:
                with _calibration_hooks_reachable(targets), _windows_as_given(), search:
                    model.quantize(mode, config=config,  # the walk filters layers again
                                   filters=lambda layer: id(layer) in inside)
            except ValueError as e:
                raise UserError(f"--quantize={mode}: Keras refused: {e}") from None
        int4 = keras.quantizers.Int4QuantizationConfig(block_size=group_size)
        try:  # plain int4 inside the blocks (after gptq/awq: nothing left there) ...
            model.quantize("int4", config=int4,
                           filters=lambda layer: id(layer) in inside and wanted(layer))
            if head == "int8":  # ... then the head and embedding outside them
                model.quantize("int8", filters=wanted)
            elif head == "int4":
                model.quantize("int4", config=int4, filters=wanted)
        except ValueError as e:
            raise UserError(f"--quantize={mode}: Keras refused: {e}") from None


def quantize_run(model, exp, tok, mode: str, group_size: int = 128, calibration_data: str = "",
                 calibration_samples: int = 256, seq_len: int = 0, log=None,
                 workdir: str = "", head: str = HEAD_DEFAULT) -> object:
    """`quantize_weights` for a loaded run; returns the quantized model: `model` itself,
    or for a LoRA run its adapters merged first (as export does), so that generate and
    evaluate score what the export serves. gptq/awq calibrate on `calibration_data` or,
    when empty, on the run's own prepared data (`--data.data_dir`, else the workdir's
    `data/`, where training on the embedded corpus prepares it).

    Args:
      model, exp, tok: the loaded run (`load_workdir`, `load_run_tokenizer`).
      mode: one of `MODES`.
      group_size: 4-bit modes: inputs per scale (-1 = per output channel).
      calibration_data: a JSONL/text file or a prepared data dir ("" = `exp.data.data_dir`).
      calibration_samples: calibration windows at most.
      seq_len: tokens per window (0 = the run's `--data.seq_len`).
      log: gets one line on what was quantized.
      workdir: the run's directory (finds its default prepared data).
      head: 4-bit modes: the untied output head and the embedding, one of `HEAD_MODES`.
    """
    if mode == "none":
        return model
    from deepseek_tf.lora import merged_model
    model = merged_model(model)                     # unchanged without adapters
    windows = None
    if mode in ("gptq", "awq"):                   # bad flags before reading any data
        _check_group_size(model, _kept(model), mode, group_size)
        source = calibration_data or (prepared_data_dir(exp.data.data_dir, workdir)
                                      if exp.data.data_dir or workdir else "")
        if not source or not (calibration_data or os.path.exists(source)):
            where = f" (none at {source})" if source else ""
            raise UserError(f"--quantize={mode} needs calibration data and found no prepared "
                            f"data of the run{where}: pass --calibration_data=FILE_OR_DIR.")
        windows = calibration_windows(source, tok, seq_len or exp.data.seq_len,
                                      calibration_samples, exp.data.template)
    quantize_weights(model, mode, group_size, windows, tok, head)
    if log and mode != "none":
        log(f"quantized weights: {mode}" + (f", group size {group_size}" if mode != "int8"
                                           else "")
            + (f", calibrated on {len(windows.tokens)} windows of {windows.tokens.shape[1]} "
               f"tokens"
               if windows is not None else ""))
    return model
