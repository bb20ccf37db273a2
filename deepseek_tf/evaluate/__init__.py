"""Evaluation of a workdir: perplexity, generation metrics, classification.

`python -m deepseek_tf.evaluate --workdir=DIR --data.inputs=FILE [--task=...]` loads the
workdir's model (a LoRA run with its adapters) and tokenizer, runs one task of
`evaluate/tasks.py` and writes `<workdir>/eval/<task>-<data name>.json` (metrics and
per-sample predictions) and a table on stdout.

Example:
    >>> result = evaluate_workdir("runs/sft", ["data/heldout.jsonl"], task="generate")
    >>> result["metrics"]["exact_match"]
"""

from __future__ import annotations

import json
import os

from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError
from deepseek_tf.data.records import read_records  # noqa: F401  (re-exported)

RESULTS_DIR = "eval"


def format_table(metrics: dict) -> str:
    """A two-column text table of the metrics."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}} | value", f"{'-' * width}-|-------"]
    for k, v in metrics.items():
        value = f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"
        lines.append(f"{k:<{width}} | {value}")
    return "\n".join(lines)


def evaluate_workdir(workdir: str, inputs: list[str], task: str = "auto", template: str = "",
                     max_samples: int = 0, max_length: int = 0, output: str = "",
                     checkpoint: str = "", log=print, quantize: dict | None = None,
                     **options) -> dict:
    """Evaluates `workdir`'s model on `inputs`; writes and returns the results.

    Args:
      workdir: a train or convert workdir.
      inputs: data files (see `read_records`).
      task: lm, generate, classify, or auto (from the first record's fields).
      template: chat template name; default the run's `--data.template` when it trained
        on alpaca/sharegpt data, else none (prompts are plain text after BOS).
      max_samples: evaluate at most this many records (0 = all).
      max_length: tokens per scored window / generation cache (0 = the run's seq_len;
        generate: the longest prompt + max_new_tokens).
      output: the results file (default `<workdir>/eval/<task>-<data name>.json`).
      checkpoint: a checkpoint path instead of the latest.
      quantize: keyword arguments of `deepseek_tf.quantize.quantize_run` (mode=...,
        group_size, calibration_data, calibration_samples): score the quantized model.
      options: batch_size; generate: max_new_tokens and jit_compile (auto, true or
        false); classify: normalize ("none" or "tokens", see `tasks.NORMALIZE`).
    """
    from deepseek_tf.evaluate.tasks import detect_task, run_task
    from deepseek_tf.generate.text import chat_profile
    from deepseek_tf.workdir import load_run_tokenizer, load_workdir

    records = read_records(inputs, max_samples)
    if not records:
        raise UserError(f"--data.inputs={','.join(inputs)} holds no record.")
    task = detect_task(records[0]) if task == "auto" else task
    model, exp = load_workdir(workdir, checkpoint)
    tok = load_run_tokenizer(workdir, exp)
    if quantize:
        from deepseek_tf.quantize import quantize_run
        model = quantize_run(model, exp, tok, log=log, workdir=workdir, **quantize)
    tmpl = chat_profile(exp, tok, template).template
    name = tmpl.name if tmpl else ""
    if not max_length and task != "generate":
        max_length = exp.data.seq_len
    log(f"evaluating {workdir} on {len(records)} records: task {task}, template "
        f"{name or 'none'}")
    result = run_task(task, model, tok, records, tmpl, max_length, log=log, **options)
    result = {"task": task, "workdir": os.path.abspath(workdir), "inputs": list(inputs),
              "template": name, **({"quantize": quantize} if quantize else {}), **result}
    stem = os.path.splitext(os.path.basename(inputs[0]))[0]
    path = output or os.path.join(workdir, RESULTS_DIR, f"{task}-{stem}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    log(format_table(result["metrics"]))
    log(f"wrote {path}")
    return result
