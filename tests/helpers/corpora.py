"""Small input corpora written by the tests themselves, in every supported format."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from deepseek_tf.data import shards
from deepseek_tf.data.pipeline import _mask_parser

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Deep learning with TensorFlow.\n\nSecond paragraph, trailing spaces   \n",
    "深度求索 DeepSeek: 大语言模型 — ünïcödé text 🤖\n",
    "line one\r\nline two with a tab\tand CRLF\r\n",
    "{\"looks\": \"like json\", \"but\": [\"is text\"]}",
    "short",
]


def write_jsonl(path, records, raw_lines=()):
    """Writes records as JSON Lines; `raw_lines` (bytes) are appended verbatim."""
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def write_format(directory, fmt: str, docs=DOCS, field: str = "text") -> str:
    """Writes `docs` as one input in `fmt`; returns the path to pass as --data.inputs."""
    os.makedirs(directory, exist_ok=True)
    records = [{field: d, "id": i} for i, d in enumerate(docs)]
    if fmt == "txt_dir":
        root = os.path.join(directory, "corpus")
        for i, d in enumerate(docs):  # nested, sorted by relative path; .bin is ignored
            sub = os.path.join(root, "a" if i < 3 else "b")
            os.makedirs(sub, exist_ok=True)
            ext = (".txt", ".md", ".py")[i % 3]
            with open(os.path.join(sub, f"doc{i:02d}{ext}"), "wb") as f:
                f.write(d.encode("utf-8"))
        with open(os.path.join(root, "ignored.bin"), "wb") as f:
            f.write(b"\x00\x01")
        return root
    if fmt == "jsonl":
        return write_jsonl(os.path.join(directory, "data.jsonl"), records)
    if fmt == "json_array":
        path = os.path.join(directory, "data.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
        return path
    import pandas as pd

    frame = pd.DataFrame(records)
    if fmt == "csv":
        path = os.path.join(directory, "data.csv")
        frame.to_csv(path, index=False)
        return path
    if fmt == "parquet":
        path = os.path.join(directory, "data.parquet")
        frame.to_parquet(path)
        return path
    if fmt == "save_to_disk":
        import datasets

        path = os.path.join(directory, "hf_dataset")
        datasets.Dataset.from_pandas(frame).save_to_disk(path)
        return path
    raise ValueError(fmt)


def read_split(data_dir: str, meta: dict, split: str = "train"):
    """[(token ids, loss mask)] of one split, in file order."""
    with_mask = "loss_mask" in meta.get("features", ["tokens"])
    parse = _mask_parser(meta["token_dtype"], with_mask)
    out = []
    for path in shards.shard_paths(data_dir, meta, split):
        for record in tf.data.TFRecordDataset(path):
            ids, mask = parse(record)
            out.append((ids.numpy(), mask.numpy().astype(np.uint8)))
    return out


HF_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
               "<｜Assistant｜>")


def build_hf_tokenizer(directory, texts, vocab_size: int = 400, with_config: bool = True):
    """A byte-level BPE tokenizer.json trained with `tokenizers` (DeepSeek-style special
    tokens), plus an HF tokenizer_config.json naming BOS / EOS; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(HF_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    if with_config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": {"content": HF_SPECIALS[0]}, "eos_token": HF_SPECIALS[1],
                       "pad_token": HF_SPECIALS[2], "model_max_length": 4096}, f)
    return str(directory)
