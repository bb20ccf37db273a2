"""Export a trained workdir to deployment formats (`python -m deepseek_tf.export`).

A small dispatch: `FORMATS[name](model, experiment, output_dir, log)`. Formats:
  hf  config.json + model.safetensors that transformers' `from_pretrained` loads
      (DeepseekV3 / DeepseekV2 / Llama / Qwen2, whichever represents the config).
Further formats (SavedModel, TFLite) register here.

Example:
    >>> model, exp = load_workdir("runs/tiny")
    >>> export(model, exp, "hf", "out/tiny-hf")
"""

from __future__ import annotations

import os
from typing import Callable

from deepseek_tf.config import Experiment, UserError
from deepseek_tf.export import hf

FORMATS: dict[str, Callable] = {"hf": hf.export_hf}


def load_workdir(workdir: str, checkpoint: str = ""):
    """(model with the latest (or given) checkpoint's weights, Experiment) of a workdir."""
    import tensorflow as tf

    from deepseek_tf.model import DeepSeekCausalLM

    exp = Experiment.load(os.path.join(workdir, "config.json")) if os.path.exists(
        os.path.join(workdir, "config.json")) else None
    if exp is None:
        raise UserError(f"{workdir} has no config.json: not a deepseek_tf workdir.")
    path = checkpoint or tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if not path:
        raise UserError(f"{workdir}/checkpoints holds no checkpoint to export.")
    model = DeepSeekCausalLM(exp.model)
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial() \
            .assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot restore {path}: {first}") from e
    return model, exp


def export(model, exp: Experiment, fmt: str, output: str, log=print,
           workdir: str | None = None) -> str:
    """Writes `model` in format `fmt` to `output`; `workdir` supplies the run's tokenizer."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}.")
    return FORMATS[fmt](model, exp, output, log=log, workdir=workdir)
