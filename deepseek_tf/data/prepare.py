"""Raw corpus -> tokenized, sharded TFRecords + metadata.json.

Example:
    >>> meta = prepare(DataConfig(max_documents=20), "/tmp/stdlib-data")
    >>> meta["splits"]["train"]["documents"] > 0
    True
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from deepseek_tf.config import DataConfig, UserError
from deepseek_tf.data import corpus as corpus_lib
from deepseek_tf.data import shards as shards_lib
from deepseek_tf.data.tokenizer import make_tokenizer


def _documents(cfg: DataConfig):
    if cfg.corpus == "stdlib":
        return list(corpus_lib.stdlib_documents(cfg.max_documents)), {
            "name": "stdlib", "root": corpus_lib.stdlib_root(),
            "python": sys.version.split()[0]}
    raise UserError(f"unknown corpus {cfg.corpus!r}.")


def prepare(cfg: DataConfig, data_dir: str, log=print) -> dict:
    """Tokenizes the configured corpus into `data_dir` and returns its metadata.

    Re-running on a finished directory with the same settings does nothing.

    Args:
      cfg: the data config (corpus, tokenizer, split, shard size).
      data_dir: output directory.
      log: progress printer.
    """
    tok = make_tokenizer(cfg.tokenizer)
    docs, corpus_info = _documents(cfg)
    names = [d.name for d in docs]
    corpus_info["fingerprint"] = hashlib.sha256(
        b"".join(d.name.encode() + b"\0" + hashlib.sha256(d.data).digest() for d in docs)
    ).hexdigest()[:16]
    settings = {"corpus": corpus_info, "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint},
                "val_size": cfg.val_size, "max_documents": cfg.max_documents}
    existing = os.path.join(data_dir, shards_lib.METADATA_FILE)
    if os.path.exists(existing):
        meta = shards_lib.read_metadata(data_dir)
        if all(meta.get(k) == v for k, v in settings.items()):
            log(f"data already prepared in {data_dir}")
            return meta
        raise UserError(f"{data_dir} already holds data prepared with other settings; "
                        f"choose a new --data.data_dir or remove that directory.")

    val = corpus_lib.validation_names(names, cfg.val_size)
    dtype = shards_lib.token_dtype_for(tok.vocab_size)
    shard_bytes = int(cfg.shard_size_mb * 1e6)
    writers = {s: shards_lib.ShardWriter(data_dir, s, shard_bytes, dtype) for s in shards_lib.SPLITS}
    t0 = time.time()
    for doc in docs:
        writers["validation" if doc.name in val else "train"].add(tok.encode(doc.data))
    splits = {}
    for split, w in writers.items():
        shards = w.close()
        splits[split] = {"documents": sum(s["documents"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    if splits["train"]["documents"] == 0:
        raise UserError("prepare produced no training documents; lower --data.val_size "
                        "or add documents.")
    tok.save(data_dir)
    meta = {**settings, "token_dtype": dtype, "splits": splits}
    shards_lib.write_metadata(data_dir, meta)
    dt = time.time() - t0
    total = sum(s["tokens"] for s in splits.values())
    log(f"prepared {len(docs)} documents, {total:,} tokens into {data_dir} "
        f"({len(splits['train']['shards'])} train / {len(splits['validation']['shards'])} "
        f"validation shards) in {dt:.1f}s ({total / max(dt, 1e-9):,.0f} tokens/s)")
    return shards_lib.read_metadata(data_dir)
