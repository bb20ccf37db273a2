"""TFRecord shards of tokenized documents, and their `metadata.json`.

Format: each record is a `tf.train.Example` with one feature, `tokens`: the
document's token ids as raw little-endian integers (`token_dtype` in the
metadata: uint16 when the vocabulary fits, else int32). A shard is written to a
temporary name and renamed when complete, so an interrupted run never leaves a
half shard that looks finished; `metadata.json` is written last, the same way.

Example:
    >>> w = ShardWriter("/tmp/d", "train", shard_bytes=1 << 20, token_dtype="uint16")
    >>> w.add(np.array([256, 104, 105, 257]))
    >>> infos = w.close()
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from deepseek_tf.config import UserError

METADATA_FILE = "metadata.json"
METADATA_VERSION = 1
SPLITS = ("train", "validation")


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def serialize(tokens: np.ndarray, token_dtype: str) -> bytes:
    raw = np.asarray(tokens).astype(np.dtype(token_dtype).newbyteorder("<")).tobytes()
    feature = {"tokens": tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class ShardWriter:
    """Writes documents into size-bounded shards `<split>-NNNNN.tfrecord`.

    Args:
      directory: output directory (created).
      split: split name, the shard file prefix.
      shard_bytes: a shard is closed once it holds at least this many bytes.
      token_dtype: "uint16" or "int32".
    """

    def __init__(self, directory: str, split: str, shard_bytes: int, token_dtype: str):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.split = directory, split
        self.shard_bytes, self.token_dtype = shard_bytes, token_dtype
        self.shards: list[dict] = []
        self._writer = None
        self._tmp = self._name = ""
        self._docs = self._tokens = self._bytes = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            self._name = f"{self.split}-{len(self.shards):05d}.tfrecord"
            self._tmp = os.path.join(self.directory, f".{self._name}.tmp-{os.getpid()}")
            self._writer = tf.io.TFRecordWriter(self._tmp)
        record = serialize(tokens, self.token_dtype)
        self._writer.write(record)
        self._docs += 1
        self._tokens += int(len(tokens))
        self._bytes += len(record)
        if self._bytes >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        final = os.path.join(self.directory, self._name)
        os.replace(self._tmp, final)
        self.shards.append({"file": self._name, "documents": self._docs, "tokens": self._tokens,
                            "bytes": os.path.getsize(final), "sha256": sha256_file(final)})
        self._writer = None
        self._docs = self._tokens = self._bytes = 0

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.shards


def write_metadata(directory: str, metadata: dict) -> None:
    path = os.path.join(directory, METADATA_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": METADATA_VERSION, **metadata}, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_metadata(directory: str, verify: str = "size") -> dict:
    """Reads and checks `metadata.json` of a prepared data directory.

    Args:
      directory: the prepared data directory.
      verify: "none", "size" (every shard exists with its recorded size) or
        "sha256" (also recompute every shard's checksum).

    Raises:
      UserError: one line naming the problem and how to fix it.
    """
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isdir(directory):
        raise UserError(f"data directory {directory} does not exist; run "
                        f"`python -m deepseek_tf.prepare --data.data_dir={directory}`.")
    if not os.path.exists(path):
        raise UserError(f"data directory {directory} has no {METADATA_FILE} (an interrupted "
                        f"prepare?); re-run `python -m deepseek_tf.prepare "
                        f"--data.data_dir={directory}` or remove the directory.")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; re-run prepare into a new directory.") from e
    if not isinstance(meta, dict) or meta.get("version") != METADATA_VERSION:
        raise UserError(f"{path} is not a deepseek_tf metadata file of version "
                        f"{METADATA_VERSION}; re-run prepare into a new directory.")
    for split in SPLITS:
        for shard in meta.get("splits", {}).get(split, {}).get("shards", []):
            shard_path = os.path.join(directory, shard["file"])
            if not os.path.exists(shard_path):
                raise UserError(f"shard {shard_path} listed in {path} is missing; "
                                f"re-run prepare into a new directory.")
            if verify in ("size", "sha256") and os.path.getsize(shard_path) != shard["bytes"]:
                raise UserError(f"shard {shard_path} has {os.path.getsize(shard_path)} bytes but "
                                f"{path} says {shard['bytes']} (truncated or replaced); "
                                f"re-run prepare into a new directory.")
            if verify == "sha256" and sha256_file(shard_path) != shard["sha256"]:
                raise UserError(f"shard {shard_path} fails its sha256 check (corrupt); "
                                f"re-run prepare into a new directory.")
    return meta


def shard_paths(directory: str, meta: dict, split: str) -> list[str]:
    shards = meta["splits"].get(split, {}).get("shards", [])
    return [os.path.join(directory, s["file"]) for s in shards]
