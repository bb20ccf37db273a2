"""TFRecord shards of tokenized documents, and their `metadata.json`.

Format: each record is a `tf.train.Example` with the feature `tokens`: the
document's token ids as raw little-endian integers (`token_dtype` in the
metadata: uint16 when the vocabulary fits, else int32); SFT samples also carry
`loss_mask`, one uint8 per token (1 = the token is a training target). A shard
is written to a temporary name and renamed when complete, so an interrupted run
never leaves a half shard that looks finished; `metadata.json` is written last,
the same way. A writer can start after already finished shards (resume).

A shard that turns out corrupt while training (TF raises DataLossError, which
names neither the file nor, when raised inside a tf.function, anything
actionable) is located by `guard_data_errors`: one UserError naming the file
and the byte offset of the bad record.

Example:
    >>> w = ShardWriter("/tmp/d", "train", shard_bytes=1 << 20, token_dtype="uint16")
    >>> w.add(np.array([256, 104, 105, 257]))
    >>> infos = w.close()
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import numpy as np
import tensorflow as tf

from deepseek_tf.atomic import atomic_write
from deepseek_tf.errors import UserError
from deepseek_tf.workdir_files import METADATA_FILE  # noqa: F401  (shards.METADATA_FILE)

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


def serialize(tokens: np.ndarray, token_dtype: str, loss_mask: np.ndarray | None = None) -> bytes:
    raw = np.asarray(tokens).astype(np.dtype(token_dtype).newbyteorder("<")).tobytes()
    feature = {"tokens": tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))}
    if loss_mask is not None:
        mask = np.asarray(loss_mask, np.uint8).tobytes()
        feature["loss_mask"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def length_bin(n: int) -> int:
    """Histogram bin of a token count: bin k holds lengths in [2^k, 2^(k+1)) (0 in bin 0)."""
    return max(int(n), 1).bit_length() - 1


def merge_histograms(hists: list[list[int]]) -> dict:
    """Sums per-shard histograms: {"bin_edges": [1, 2, 4, ...], "counts": [...]}."""
    n = max((len(h) for h in hists), default=0)
    counts = [sum(h[k] for h in hists if k < len(h)) for k in range(n)]
    return {"bin_edges": [1 << k for k in range(n + 1)], "counts": counts}


class ShardWriter:
    """Writes documents into size-bounded shards `<split>-NNNNN.tfrecord`.

    Each finished shard's info holds its file, documents, tokens, bytes, sha256,
    a token-length histogram and the `stats` counted (via `count`) while it was
    open; counts made while no shard is open go to the next one (`leftover`
    after `close`).

    Args:
      directory: output directory (created).
      split: split name, the shard file prefix.
      shard_bytes: a shard is closed once it holds at least this many bytes.
      token_dtype: "uint16" or "int32".
      done: infos of shards finished by an interrupted run; numbering continues.
      on_shard: called with the list of finished shard infos after each shard.
    """

    def __init__(self, directory: str, split: str, shard_bytes: int, token_dtype: str,
                 done: list[dict] | None = None, on_shard=None):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.split = directory, split
        self.shard_bytes, self.token_dtype = shard_bytes, token_dtype
        self.shards: list[dict] = list(done or [])
        self.on_shard = on_shard
        self.leftover: dict = {}
        self._writer = None
        self._tmp = self._name = ""
        self._stats: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self._docs = self._tokens = self._bytes = 0
        self._hist: list[int] = []

    def count(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + int(n)

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        if self._writer is None:
            self._name = f"{self.split}-{len(self.shards):05d}.tfrecord"
            self._tmp = os.path.join(self.directory, f".{self._name}.tmp-{os.getpid()}")
            self._writer = tf.io.TFRecordWriter(self._tmp)
        record = serialize(tokens, self.token_dtype, loss_mask)
        self._writer.write(record)
        self._docs += 1
        self._tokens += int(len(tokens))
        self._bytes += len(record)
        b = length_bin(len(tokens))
        self._hist += [0] * (b + 1 - len(self._hist))
        self._hist[b] += 1
        if self._bytes >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        final = os.path.join(self.directory, self._name)
        os.replace(self._tmp, final)
        self.shards.append({"file": self._name, "documents": self._docs, "tokens": self._tokens,
                            "bytes": os.path.getsize(final), "sha256": sha256_file(final),
                            "length_histogram": self._hist, "stats": self._stats})
        self._writer, self._stats = None, {}
        self._reset()
        if self.on_shard is not None:
            self.on_shard(self.shards)

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        self.leftover, self._stats = self._stats, {}
        return self.shards


def write_metadata(directory: str, metadata: dict) -> None:
    path = os.path.join(directory, METADATA_FILE)
    atomic_write(path, json.dumps({"version": METADATA_VERSION, **metadata}, indent=2,
                                  sort_keys=True))


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


_BAD_RECORD = re.compile(r"(corrupted|truncated) record at (\d+)")


def find_corrupt_record(paths: list[str]) -> tuple[str, str, int] | None:
    """Reads `paths` in order; returns (path, "corrupted"/"truncated", byte offset) of
    the first bad record, or None if every file reads to the end."""
    for path in paths:
        try:
            for _ in tf.data.TFRecordDataset(path).batch(1024):
                pass
        except tf.errors.DataLossError as e:
            m = _BAD_RECORD.search(e.message or "")
            return path, (m.group(1) if m else "unreadable"), int(m.group(2)) if m else -1
    return None


def data_loss_error(error: tf.errors.DataLossError, paths: list[str]) -> UserError:
    """A DataLossError (which names no file) -> one UserError naming file and offset."""
    found = find_corrupt_record(paths)
    if found is None:
        m = _BAD_RECORD.search(error.message or "")
        what = m.group(0) if m else (error.message or "").strip().splitlines()[0]
        return UserError(f"a data shard is unreadable ({what}); check the shards against the "
                         f"sha256 in metadata.json or re-run prepare into a new directory.")
    path, kind, offset = found
    return UserError(f"shard {path} is {kind} at byte offset {offset} (a {kind} TFRecord); "
                     f"restore it (metadata.json holds its sha256) or re-run prepare into a "
                     f"new directory.")


def guard_data_errors(fn, paths: list[str]):
    """Wraps a step function: a DataLossError from the input pipeline becomes a UserError
    naming the bad shard and offset (never skipped silently).

    Example:
        >>> train_step = guard_data_errors(train_step, all_shard_paths(data_dir, meta))
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except tf.errors.DataLossError as e:
            raise data_loss_error(e, paths) from e

    return wrapped


def all_shard_paths(directory: str, meta: dict) -> list[str]:
    return [p for split in SPLITS for p in shard_paths(directory, meta, split)]
