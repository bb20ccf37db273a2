"""JSON records for evaluation, preference and GRPO prompt data: JSON Lines or a JSON
array; the prompt and reference of a record.

Example:
    >>> rows = read_records(["data/sft-demo/heldout.jsonl"])
"""

from __future__ import annotations

import json

from deepseek_tf.errors import UserError

#: Fields that hold a record's reference answer (evaluate, GRPO), first found wins.
REFERENCE_KEYS = ("output", "reference", "answer")


def normalize_answer(text: str) -> str:
    """What exact match compares (evaluate's metric, GRPO's reward): the answer without
    surrounding whitespace."""
    return text.strip()


def read_records(paths: list[str], max_samples: int = 0) -> list[dict]:
    """Records of JSON Lines / JSON array files; a .txt/.md/.py file is one {"text"}."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"cannot read --data.inputs file {path}: {e.strerror}.") from e
        if not path.endswith((".json", ".jsonl")):
            out.append({"text": raw})
            continue
        lines = [raw] if raw.lstrip().startswith("[") else raw.splitlines()
        rows = []
        for n, line in enumerate(lines, start=1):
            try:
                if line.strip():
                    row = json.loads(line)
                    rows += row if isinstance(row, list) else [row]
            except json.JSONDecodeError as e:
                where = e.lineno if len(lines) == 1 else n
                raise UserError(f"{path}: invalid JSON at line {where}: {e.msg}.") from e
        if not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: every record must be a JSON object.")
        out += rows
    return out[:max_samples] if max_samples else out


def prompt_and_reference(record: dict, i: int) -> tuple[str, str]:
    """(prompt text, reference answer) of an alpaca (`instruction` + `input`) or
    `prompt` record; `i` numbers it in the error."""
    if "instruction" in record:
        prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        raise UserError(f"record {i + 1} has no prompt (instruction or prompt field).")
    ref = next((record[k] for k in REFERENCE_KEYS if k in record), None)
    if not isinstance(ref, str):
        raise UserError(f"record {i + 1} has no reference text ({', '.join(REFERENCE_KEYS)}).")
    return prompt, ref
