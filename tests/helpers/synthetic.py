"""Prepared data directories with known documents, for exact pipeline checks."""

from __future__ import annotations

import numpy as np

from deepseek_tf.data import shards
from deepseek_tf.data.tokenizer import ByteTokenizer


def synthetic_docs(n: int, min_len: int = 3, max_len: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Documents BOS, body..., EOS whose body ids encode the document index."""
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    docs = []
    for i in range(n):
        body = (np.arange(rng.integers(min_len, max_len)) + 7 * i) % 256
        docs.append(np.concatenate([[tok.bos_id], body, [tok.eos_id]]).astype(np.int32))
    return docs


def write_data_dir(directory: str, train_docs, val_docs=(), shard_bytes: int = 400,
                   train_masks=None, val_masks=None) -> dict:
    """Writes docs as a prepared data directory (byte tokenizer) and returns its metadata.

    With masks (one uint8 array per document) the directory holds SFT samples.
    """
    tok = ByteTokenizer()
    sft = train_masks is not None
    splits = {}
    for split, docs, masks in (("train", train_docs, train_masks),
                               ("validation", val_docs, val_masks)):
        w = shards.ShardWriter(directory, split, shard_bytes, "uint16")
        for i, d in enumerate(docs):
            w.add(d, masks[i] if sft else None)
        infos = w.close()
        splits[split] = {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)),
                         "shards": infos}
    tok.save(directory)
    shards.write_metadata(directory, {
        "corpus": {"name": "synthetic"}, "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint},
        "token_dtype": "uint16", "splits": splits, "kind": "sft" if sft else "text",
        "features": ["tokens", "loss_mask"] if sft else ["tokens"]})
    return shards.read_metadata(directory)
