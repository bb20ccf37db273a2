"""Export a trained workdir to deployment formats (`python -m deepseek_tf.export`).

A small dispatch: `FORMATS[name](model, experiment, output_dir, log, workdir,
**options)`. Formats:
  hf           config.json + model.safetensors that transformers' `from_pretrained`
               loads (DeepseekV3 / DeepseekV2 / Llama / Qwen2, whichever fits).
  saved_model  a SavedModel for TF Serving with `serving_default` (text in, text
               out), `chat` (messages in, reply out; runs with a chat template),
               `generate_ids` and `score` signatures (see saved_model.py).

Example:
    >>> model, exp = load_workdir("runs/tiny")
    >>> export(model, exp, "hf", "out/tiny-hf")
"""

from __future__ import annotations

from typing import Callable

from deepseek_tf.config import Experiment
from deepseek_tf.errors import UserError
from deepseek_tf.export import hf
from deepseek_tf.workdir import load_workdir  # noqa: F401  (re-exported)


def _saved_model(*args, **kwargs):
    from deepseek_tf.export.saved_model import export_saved_model
    return export_saved_model(*args, **kwargs)


def _tflite(*args, **kwargs):
    from deepseek_tf.export.tflite import export_tflite
    return export_tflite(*args, **kwargs)


def _litertlm(*args, **kwargs):
    from deepseek_tf.export.litertlm import export_litertlm
    return export_litertlm(*args, **kwargs)


FORMATS: dict[str, Callable] = {"hf": hf.export_hf, "saved_model": _saved_model,
                                "tflite": _tflite, "litertlm": _litertlm}


def export(model, exp: Experiment, fmt: str, output: str, log=print,
           workdir: str | None = None, **options) -> str:
    """Writes `model` in format `fmt` to `output`; `workdir` supplies the run's tokenizer;
    `options` are the format's own (saved_model: max_length, max_new_tokens, quantize;
    tflite / litertlm: max_length, prefill_lengths, quantize). A LoRA model is merged
    into plain weights first."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}.")
    from deepseek_tf.lora import is_lora, merged_model
    if is_lora(model):  # every format gets plain weights: W + (alpha / r) A B
        log("merging the LoRA adapters into the base weights")
        model = merged_model(model)
    return FORMATS[fmt](model, exp, output, log=log, workdir=workdir, **options)
