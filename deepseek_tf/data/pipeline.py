"""The tf.data input pipeline: shards -> documents -> packed windows -> batches.

    shard files -> (shard per input pipeline) -> seeded shuffle -> parallel
    deterministic interleave -> parallel parse -> pack into seq_len windows
    -> seeded shuffle -> batch -> [accumulation batch] -> prefetch

Packing concatenates documents (each BOS ... EOS) into a stream cut into windows
of `seq_len + 1` tokens with stride `seq_len`, so every token is a target once.
Each window carries `segment_ids` (1, 2, ... per document inside the window) and
per-document `positions`; the model's attention mask is causal AND same-segment,
so no token attends across a document boundary, and `loss_mask` drops the target
that would cross one.

Batches are dicts of int32 (B, T) tensors: inputs, targets, segment_ids,
positions; and float32 loss_mask. With `accum_steps` set every tensor gets a
leading (A,) micro-batch axis.

Example:
    >>> ds = make_dataset(DataConfig(seq_len=64), "/tmp/stdlib-data", "train",
    ...                   batch_size=4, seed=0)
    >>> batch = next(iter(ds))
    >>> batch["inputs"].shape
    TensorShape([4, 64])
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.config import DataConfig, UserError
from deepseek_tf.data import shards as shards_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _parser(token_dtype: str):
    dtype = {"uint16": tf.uint16, "int32": tf.int32}[token_dtype]
    spec = {"tokens": tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        raw = tf.io.parse_single_example(record, spec)["tokens"]
        return tf.cast(tf.io.decode_raw(raw, dtype, little_endian=True), tf.int32)

    return parse


def documents(paths: list[str], token_dtype: str, *, shuffle_seed: int | None,
              cycle_length: int, repeat: bool) -> tf.data.Dataset:
    """Token id vectors, one per document, read from `paths`.

    Args:
      paths: shard files.
      token_dtype: the metadata's `token_dtype`.
      shuffle_seed: shuffle the shard order every epoch with this seed (None: keep).
      cycle_length: shards read concurrently by the interleave.
      repeat: cycle forever.
    """
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        files = files.repeat()
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(paths)),
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    return ds.map(_parser(token_dtype), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pack(docs: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
    """Packs documents into windows of `seq_len + 1` tokens with stride `seq_len`.

    Returns a dataset of dicts with int32 (seq_len + 1,) `tokens`, `segment_ids`
    (1-based per window) and `positions` (restarting at 0 for each document;
    a document continued from the previous window restarts at 0 too, since it
    cannot attend to that window anyway).
    """
    width = seq_len + 1

    def with_ids(doc_index, tokens):
        n = tf.shape(tokens)[0]
        return tokens, tf.fill([n], doc_index), tf.range(n, dtype=tf.int32)

    def step(state, elem):
        buf = [tf.concat([s, e], 0) for s, e in zip(state, elem)]
        n_windows = tf.maximum((tf.shape(buf[0])[0] - 1) // seq_len, 0)
        idx = (tf.range(n_windows)[:, None] * seq_len) + tf.range(width)[None, :]  # (N, T+1)
        windows = [tf.gather(b, idx) for b in buf]
        rest = tuple(b[n_windows * seq_len:] for b in buf)
        return rest, tuple(windows)

    def finish(tokens, seg, pos):
        first_seg = seg[:1]
        segment_ids = tf.cast(seg - first_seg + 1, tf.int32)
        positions = tf.where(seg == first_seg, pos - pos[:1], pos)
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    init = (tf.zeros([0], tf.int32), tf.zeros([0], tf.int64), tf.zeros([0], tf.int32))
    ds = docs.enumerate().map(with_ids)
    ds = ds.scan(init, step).unbatch()
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def to_example(window: dict) -> dict:
    """A packed window -> model inputs, shifted targets and the loss mask."""
    tok, seg, pos = window["tokens"], window["segment_ids"], window["positions"]
    return {
        "inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
        "positions": pos[:-1], "loss_mask": tf.cast(tf.equal(seg[:-1], seg[1:]), tf.float32)}


def make_dataset(cfg: DataConfig, data_dir: str, split: str, batch_size: int, *, seed: int,
                 training: bool = True, accum_steps: int | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 metadata: dict | None = None) -> tf.data.Dataset:
    """The batched dataset of one split.

    Args:
      cfg: data config (seq_len, shuffle buffer, interleave width).
      data_dir: prepared data directory.
      split: "train" or "validation".
      batch_size: sequences per batch (per replica).
      seed: seed for file and window shuffling (training only).
      training: shuffle; otherwise the order is fixed (evaluation).
      accum_steps: if given, adds a leading (A,) micro-batch axis of this size
        (the train step's layout, even for A = 1).
      input_context: from `distribute_datasets_from_function`: this pipeline
        reads its share of shards (or of windows, when shards are too few).
      metadata: the directory's metadata (read if not given).

    The dataset repeats forever; take as many batches as needed.
    """
    meta = metadata or shards_lib.read_metadata(data_dir)
    paths = shards_lib.shard_paths(data_dir, meta, split)
    if not paths:
        raise UserError(f"{data_dir} has no {split} shards; re-prepare with a "
                        f"{'smaller' if split == 'train' else 'non-zero'} --data.val_size.")
    n_pipes = input_context.num_input_pipelines if input_context else 1
    pipe_id = input_context.input_pipeline_id if input_context else 0
    shard_files = n_pipes > 1 and len(paths) >= n_pipes
    if shard_files:
        paths = paths[pipe_id::n_pipes]
    docs = documents(paths, meta["token_dtype"], shuffle_seed=seed if training else None,
                     cycle_length=cfg.cycle_length, repeat=True)
    ds = pack(docs, cfg.seq_len)
    if n_pipes > 1 and not shard_files:
        ds = ds.shard(n_pipes, pipe_id)
    if training and cfg.shuffle_buffer:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if accum_steps:
        ds = ds.batch(accum_steps, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
