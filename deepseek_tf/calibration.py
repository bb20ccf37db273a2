"""GPTQ/AWQ calibration windows from a prepared data directory, a JSONL or a text file.

The documents (a prepared split's documents, a JSONL file's records, a text file's
lines) are packed as training packs them (data/pipeline.py): one after the other, cut
into windows, each document attending only to itself with positions from 0 (`Windows`
carries the segment ids and positions). Instruction records are rendered in the run's
chat template as fine-tuning renders them (`data/sft.encode`).

Example:
    >>> windows = calibration_windows("runs/tiny/data", tok, seq_len=256, count=128)
    >>> windows.tokens.shape
    (128, 256)
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from deepseek_tf.errors import UserError


class Windows(NamedTuple):
    """GPTQ/AWQ calibration windows, each field (N, T) int32, packed as training packs
    them (data/pipeline.py): token ids, segment ids (1, 2, ... per document inside a
    window) and positions (restarting at 0 for each document)."""
    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray


def as_windows(calibration) -> Windows:
    """`calibration` as `Windows`: itself, or (N, T) token ids, each window one document."""
    if isinstance(calibration, Windows):
        return calibration
    tokens = np.asarray(calibration, np.int32)
    tokens = tokens.reshape(len(tokens), -1) if tokens.size else np.zeros([0, 0], np.int32)
    return Windows(tokens, np.ones_like(tokens),
                   np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                   tokens.shape).copy())


def _cut(pieces: list, seq_len: int, count: int, path: str) -> Windows:
    """The documents `pieces` (int arrays) packed by training's own `pipeline.pack`, at
    most `count` windows of `seq_len` (the first `seq_len` tokens of each of its windows,
    which overlap by the one token a shifted target needs)."""
    import tensorflow as tf

    from deepseek_tf.data.pipeline import pack
    pieces = [np.asarray(p, np.int32).reshape(-1) for p in pieces]
    docs = tf.data.Dataset.from_generator(
        lambda: ((p, np.ones_like(p)) for p in pieces),
        output_signature=(tf.TensorSpec([None], tf.int32),) * 2)
    got = [[w[k][:seq_len] for k in ("tokens", "segment_ids", "positions")]
           for w in pack(docs, seq_len).take(count).as_numpy_iterator()]
    if not got:
        total = sum(p.size for p in pieces)
        raise UserError(f"--calibration_data={path}: {total} tokens, fewer than one "
                        f"window of {seq_len} and the token after it ({seq_len + 1}); give more text.")
    return Windows(*(np.stack(a).astype(np.int32) for a in zip(*got)))


def _record_ids(record: dict, i: int, tok, template: str) -> np.ndarray:
    """int32 ids of one JSONL calibration record: its "text", or an instruction record
    (alpaca `instruction` + `input` -> `output`, sharegpt `conversations` / `messages`,
    `prompt` -> its answer under `REFERENCE_KEYS`, if any) rendered by the chat
    `template` as SFT renders it, so that the calibration sees what the fine-tuned model
    saw."""
    from deepseek_tf.data import sft
    from deepseek_tf.data.records import REFERENCE_KEYS
    from deepseek_tf.data.templates import TEMPLATES
    if isinstance(record.get("text"), str):
        return np.asarray(tok.encode(record["text"]), np.int32)
    try:
        if "conversations" in record or "messages" in record:
            conv = sft.parse_record(record, "sharegpt")
        elif "instruction" in record:
            conv = sft.parse_record(record, "alpaca")
        elif "prompt" in record:
            answer = next((record[k] for k in REFERENCE_KEYS
                           if isinstance(record.get(k), str)), "")
            conv = sft.Conversation("", "", (("user", str(record["prompt"])),
                                             ("assistant", answer)))
        else:
            raise sft.BadSample("no text, instruction, prompt or conversations field")
        encoded = sft.encode(conv, TEMPLATES[template], tok, cutoff_len=1 << 30,
                             train_on_prompt=True)
        return encoded[0] if encoded else np.zeros([0], np.int32)
    except sft.BadSample as e:
        raise UserError(f"--calibration_data: record {i + 1}: {e}.") from None


def calibration_windows(path: str, tok, seq_len: int, count: int = 256,
                        template: str = "deepseek3") -> Windows:
    """`Windows` (count, seq_len) for GPTQ/AWQ calibration: the documents (records,
    lines) packed as training packs them, each attending only to itself.

    Args:
      path: a prepared data directory (its train split, so that validation stays
        unseen; else validation), a JSONL file (each record's "text", or an
        instruction record rendered with `template`, see `_record_ids`) or a plain
        text file.
      tok: the run's tokenizer (for files).
      seq_len: tokens per window.
      count: at most this many windows.
      template: the chat template of instruction records (the run's `--data.template`).
    """
    if not path or not os.path.exists(path):
        raise UserError(f"--calibration_data={path!r}: no such file or directory; give a "
                        f"JSONL/text file or a prepared data directory.")
    pieces = []  # int32 token arrays, one per document
    if os.path.isdir(path):
        from deepseek_tf.data.pipeline import documents
        from deepseek_tf.data.shards import read_metadata, shard_paths
        meta = read_metadata(path)
        paths = shard_paths(path, meta, "train") or shard_paths(path, meta, "validation")
        for tokens, _ in documents(paths, meta["token_dtype"], shuffle_seed=None,
                                   cycle_length=1, repeat=False).take(4 * count):
            pieces.append(tokens.numpy())
    else:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        for i, line in enumerate(lines[:4 * count]):
            if not path.endswith(".jsonl"):
                pieces.append(np.asarray(tok.encode(line), np.int32))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--calibration_data={path}: invalid JSON at line "
                                f"{i + 1}: {e.msg}.") from None
            if not isinstance(record, dict):
                raise UserError(f"--calibration_data={path}: line {i + 1} is not a JSON "
                                f"object.")
            pieces.append(_record_ids(record, i, tok, template))
    return _cut(pieces, seq_len, count, path)
