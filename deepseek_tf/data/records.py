"""JSON records for evaluation and preference data: JSON Lines or a JSON array.

Example:
    >>> rows = read_records(["data/sft-demo/heldout.jsonl"])
"""

from __future__ import annotations

import json

from deepseek_tf.errors import UserError


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
