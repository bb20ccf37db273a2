"""The tf.data input pipeline: shards -> documents -> packed windows -> batches.

    shard files -> (shard per input pipeline) -> seeded shuffle -> parallel
    deterministic interleave -> parallel parse -> pack into seq_len windows
    -> seeded shuffle -> [input masking] -> batch -> [accumulation batch] -> prefetch

Every document carries a per-token mask (1 = the token is a training target):
all ones for pretraining, the chat template's loss mask for SFT shards.

Packing (`--data.packing=pack`):
- pretraining: documents (each BOS ... EOS) are concatenated into a stream cut
  into windows of `seq_len + 1` tokens with stride `seq_len`, so every token is
  a target once; a document may continue in the next window.
- SFT: samples are packed whole, greedily: a sample that does not fit the rest
  of the window starts the next one, and the rest is padding. A sample is never
  split, so an answer never loses its prompt.
Sliding windows (`--data.packing=window`): one document per row, cut into
windows overlapping by `--data.stride` tokens; the overlap is context only.

Each window carries `segment_ids` (1, 2, ... per document inside the window; 0
for padding) and per-document `positions`; the model's attention mask is causal
AND same-segment, so no token attends across documents or samples, and
`loss_mask` keeps only targets inside the same segment whose mask is 1.

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

from deepseek_tf.config import DataConfig
from deepseek_tf.data import shards as shards_lib
from deepseek_tf.errors import UserError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_DTYPES = {"uint16": tf.uint16, "int32": tf.int32}


def _parser(token_dtype: str):
    """record -> int32 token ids (the tokens feature only)."""
    parse = _mask_parser(token_dtype, with_mask=False)
    return lambda record: parse(record)[0]


def _mask_parser(token_dtype: str, with_mask: bool):
    """record -> (int32 tokens, int32 mask); the mask is all ones without a loss_mask."""
    dtype = _DTYPES[token_dtype]
    spec = {"tokens": tf.io.FixedLenFeature([], tf.string)}
    if with_mask:
        spec["loss_mask"] = tf.io.FixedLenFeature([], tf.string)

    def parse(record):
        feats = tf.io.parse_single_example(record, spec)
        tokens = tf.cast(tf.io.decode_raw(feats["tokens"], dtype, little_endian=True), tf.int32)
        if with_mask:
            mask = tf.cast(tf.io.decode_raw(feats["loss_mask"], tf.uint8), tf.int32)
        else:
            mask = tf.ones_like(tokens)
        return tokens, mask

    return parse


def documents(paths: list[str], token_dtype: str, *, shuffle_seed: int | None,
              cycle_length: int, repeat: bool, with_mask: bool = False) -> tf.data.Dataset:
    """(tokens, mask) int32 vectors, one pair per document, read from `paths`.

    Args:
      paths: shard files.
      token_dtype: the metadata's `token_dtype`.
      shuffle_seed: shuffle the shard order every epoch with this seed (None: keep).
      cycle_length: shards read concurrently by the interleave.
      repeat: cycle forever.
      with_mask: the shards carry a `loss_mask` feature (SFT).
    """
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        files = files.repeat()
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(paths)),
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    return ds.map(_mask_parser(token_dtype, with_mask), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


def _window_dict(tokens, seg, pos, mask):
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "mask": mask}


def pack(docs: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
    """Packs a stream of documents into windows of `seq_len + 1` tokens, stride `seq_len`.

    Returns a dataset of dicts with int32 (seq_len + 1,) `tokens`, `segment_ids`
    (1-based per window), `positions` (restarting at 0 for each document; a
    document continued from the previous window restarts at 0 too, since it
    cannot attend to that window anyway) and `mask` (the documents' masks).
    """
    width = seq_len + 1

    def with_ids(doc_index, doc):
        tokens, mask = doc
        n = tf.shape(tokens)[0]
        return tokens, tf.fill([n], doc_index), tf.range(n, dtype=tf.int32), mask

    def step(state, elem):
        buf = [tf.concat([s, e], 0) for s, e in zip(state, elem)]
        n_windows = tf.maximum((tf.shape(buf[0])[0] - 1) // seq_len, 0)
        idx = (tf.range(n_windows)[:, None] * seq_len) + tf.range(width)[None, :]  # (N, T+1)
        windows = [tf.gather(b, idx) for b in buf]
        rest = tuple(b[n_windows * seq_len:] for b in buf)
        return rest, tuple(windows)

    def finish(tokens, seg, pos, mask):
        first_seg = seg[:1]
        segment_ids = tf.cast(seg - first_seg + 1, tf.int32)
        positions = tf.where(seg == first_seg, pos - pos[:1], pos)
        return _window_dict(tokens, segment_ids, positions, mask)

    init = (tf.zeros([0], tf.int32), tf.zeros([0], tf.int64), tf.zeros([0], tf.int32),
            tf.zeros([0], tf.int32))
    ds = docs.enumerate().map(with_ids)
    ds = ds.scan(init, step).unbatch()
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pack_whole(docs: tf.data.Dataset, seq_len: int, pad_id: int) -> tf.data.Dataset:
    """Greedy packing that never splits a sample (SFT).

    Samples are appended to the current window while they fit in `seq_len + 1`
    tokens; a sample that does not fit closes the window (padded with `pad_id`,
    segment 0, mask 0) and starts the next. Samples longer than a window are
    truncated to it (prepare's cutoff_len normally prevents that).
    """
    width = seq_len + 1

    def step(state, elem):
        tok, seg, pos, mask = state                       # the open window, <= width
        new_tok, new_mask = elem[0][:width], elem[1][:width]
        n, m = tf.shape(tok)[0], tf.shape(new_tok)[0]
        emit = (n > 0) & (n + m > width)                  # the sample does not fit
        pad = width - n
        window = (tf.pad(tok, [[0, pad]], constant_values=pad_id), tf.pad(seg, [[0, pad]]),
                  tf.pad(pos, [[0, pad]]), tf.pad(mask, [[0, pad]]))
        windows = tuple(tf.reshape(w, [1, width])[:tf.cast(emit, tf.int32)] for w in window)
        next_seg = tf.where(emit, 1, tf.reduce_max(tf.concat([seg, [0]], 0)) + 1)
        sample = (new_tok, tf.fill([m], next_seg), tf.range(m, dtype=tf.int32), new_mask)
        start = tf.where(emit, n, 0)                      # drop the emitted window
        return tuple(tf.concat([s[start:], x], 0) for s, x in zip(state, sample)), windows

    init = (tf.zeros([0], tf.int32),) * 4
    ds = docs.scan(init, step).unbatch()
    return ds.map(lambda *w: _window_dict(*w), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


def sliding_windows(docs: tf.data.Dataset, seq_len: int, stride: int,
                    pad_id: int) -> tf.data.Dataset:
    """One document per row: windows of `seq_len + 1` tokens starting every
    `seq_len - stride` tokens, so consecutive windows overlap by `stride` tokens;
    in every window but the first, the overlapping targets are masked (context
    only), so each token is a target once. Positions restart at 0 in every window
    (rotary attention is relative); short tails are padded."""
    width, step = seq_len + 1, seq_len - stride

    def cut(tokens, mask):
        n = tf.shape(tokens)[0]
        count = 1 + (tf.maximum(n - width, 0) + step - 1) // step
        idx = tf.range(count)[:, None] * step + tf.range(width)[None, :]      # (W, T+1)
        valid = idx < n
        safe = tf.minimum(idx, n - 1)
        col = tf.range(width)[None, :]
        fresh = (tf.range(count)[:, None] == 0) | (col > stride)              # not overlap
        return _window_dict(
            tf.where(valid, tf.gather(tokens, safe), pad_id),
            tf.cast(valid, tf.int32), tf.where(valid, col, 0),
            tf.where(valid & fresh, tf.gather(mask, safe), 0))

    ds = docs.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.unbatch()


def to_example(window: dict) -> dict:
    """A window -> model inputs, shifted targets and the loss mask."""
    tok, seg, pos = window["tokens"], window["segment_ids"], window["positions"]
    same = tf.equal(seg[:-1], seg[1:]) & (seg[1:] > 0)
    target = window["mask"][1:] > 0 if "mask" in window else tf.ones_like(same)
    return {
        "inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
        "positions": pos[:-1], "loss_mask": tf.cast(same & target, tf.float32)}


def mask_inputs(example: dict, seed, kind: str, rate: float, span: int, mask_id: int) -> dict:
    """Input masking (augmentation): replaces random tokens ("token") or spans of
    `span` tokens ("span") of the real (non-padding) inputs by `mask_id`; about
    `rate` of the tokens are masked; targets and loss mask are unchanged.

    Args:
      seed: int64 (2,) stateless seed (deterministic per window).
    """
    inputs = example["inputs"]
    u = tf.random.stateless_uniform(tf.shape(inputs), seed=seed)
    if kind == "token":
        masked = u < rate
    else:
        # Span starts with probability p make ~1 - (1 - p)^span of the tokens masked.
        p = 1.0 - (1.0 - rate) ** (1.0 / span)
        starts = tf.cast(u < p, tf.int32)
        c = tf.cumsum(starts, axis=-1)
        before = tf.concat([tf.zeros([span], tf.int32), c], 0)[:tf.shape(c)[0]]
        masked = (c - before) > 0
    masked &= example["segment_ids"] > 0
    return {**example, "inputs": tf.where(masked, mask_id, inputs)}


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
    sft = meta.get("kind", "text") == "sft"
    pad_id = int(meta["tokenizer"].get("pad_id", 0))
    docs = documents(paths, meta["token_dtype"], shuffle_seed=seed if training else None,
                     cycle_length=cfg.cycle_length, repeat=True,
                     with_mask="loss_mask" in meta.get("features", ["tokens"]))
    if cfg.packing == "window":
        ds = sliding_windows(docs, cfg.seq_len, cfg.stride, pad_id)
    elif sft:
        ds = pack_whole(docs, cfg.seq_len, pad_id)
    else:
        ds = pack(docs, cfg.seq_len)
    if n_pipes > 1 and not shard_files:
        ds = ds.shard(n_pipes, pipe_id)
    if training and cfg.shuffle_buffer:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and cfg.augment != "none":
        ds = ds.enumerate().map(
            lambda i, ex: mask_inputs(ex, tf.stack([tf.cast(seed, tf.int64), i]), cfg.augment,
                                      cfg.mask_rate, cfg.mask_span, pad_id),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if accum_steps:
        ds = ds.batch(accum_steps, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
