"""tf.data pipeline: exact packing (text, SFT, sliding windows), masking augmentation,
determinism, sharding, iterator checkpoints, bad shards."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DataConfig
from deepseek_tf.data import shards
from deepseek_tf.data.pipeline import make_dataset
from deepseek_tf.data.tokenizer import ByteTokenizer
from deepseek_tf.errors import UserError
from tests.helpers.synthetic import synthetic_docs, write_data_dir


def _windows(ds, n):
    it = iter(ds)
    return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def test_packing_is_exact(tmp_path):
    docs = synthetic_docs(30)
    write_data_dir(str(tmp_path), docs, docs[:2], shard_bytes=1 << 20)  # one shard: fixed order
    cfg = DataConfig(seq_len=16, shuffle_buffer=0, cycle_length=1)
    ds = make_dataset(cfg, str(tmp_path), "train", batch_size=1, seed=0, training=False)
    stream = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos_of = np.concatenate([np.arange(len(d)) for d in docs])
    n = (len(stream) - 1) // 16
    for w, b in enumerate(_windows(ds, n)):
        lo = w * 16
        np.testing.assert_array_equal(b["inputs"][0], stream[lo:lo + 16])
        np.testing.assert_array_equal(b["targets"][0], stream[lo + 1:lo + 17])
        docs_in = doc_of[lo:lo + 16]
        np.testing.assert_array_equal(b["segment_ids"][0], docs_in - docs_in[0] + 1)
        # Positions restart at every document; the first (continued) one restarts at 0 too.
        pos = pos_of[lo:lo + 16]
        expect = np.where(docs_in == docs_in[0], pos - pos[0], pos)
        np.testing.assert_array_equal(b["positions"][0], expect)
        # The loss skips exactly the targets that belong to the next document.
        np.testing.assert_array_equal(b["loss_mask"][0], (doc_of[lo + 1:lo + 17] == docs_in))


def test_shapes_dtypes_and_accumulation_axis(stdlib_data):
    cfg, data_dir, meta = stdlib_data
    b = _windows(make_dataset(cfg, data_dir, "train", 3, seed=1, accum_steps=2), 1)[0]
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert b[k].shape == (2, 3, cfg.seq_len) and b[k].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32


def test_seeded_shuffle_is_deterministic(stdlib_data):
    cfg, data_dir, _ = stdlib_data
    a = _windows(make_dataset(cfg, data_dir, "train", 4, seed=3), 5)
    b = _windows(make_dataset(cfg, data_dir, "train", 4, seed=3), 5)
    c = _windows(make_dataset(cfg, data_dir, "train", 4, seed=4), 5)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_iterator_checkpoint_resumes_with_the_next_batch(stdlib_data, tmp_path):
    cfg, data_dir, _ = stdlib_data
    it = iter(make_dataset(cfg, data_dir, "train", 4, seed=0, accum_steps=1))
    for _ in range(3):
        next(it)
    ckpt = tf.train.Checkpoint(data=it)
    path = ckpt.save(str(tmp_path / "it"))
    expected = [next(it)["inputs"].numpy() for _ in range(3)]
    it2 = iter(make_dataset(cfg, data_dir, "train", 4, seed=0, accum_steps=1))
    tf.train.Checkpoint(data=it2).restore(path)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["inputs"].numpy(), e)


def test_input_pipelines_read_disjoint_shards(tmp_path):
    docs = synthetic_docs(40)
    meta = write_data_dir(str(tmp_path), docs, docs[:2], shard_bytes=300)
    assert len(meta["splits"]["train"]["shards"]) >= 4
    cfg = DataConfig(seq_len=8, shuffle_buffer=0)
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        ds = make_dataset(cfg, str(tmp_path), "train", 2, seed=0, training=False,
                          input_context=ctx)
        # A document is identified by the token after its BOS (7 * index % 256).
        starts = set()
        for b in _windows(ds, 12):
            starts |= set(b["targets"][b["inputs"] == 256].tolist())
        seen.append(starts)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def _sft_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    docs = synthetic_docs(n, min_len=1, max_len=15, seed=seed)  # <= 16 tokens: fits
    masks = []
    for d in docs:  # a prompt part (0) then an answer part (1)
        cut = int(rng.integers(1, len(d)))
        masks.append(np.concatenate([np.zeros(cut), np.ones(len(d) - cut)]).astype(np.uint8))
    return docs, masks


def _expected_example(window_tokens, window_seg, window_pos, window_mask):
    tok, seg = np.array(window_tokens), np.array(window_seg)
    same = (seg[:-1] == seg[1:]) & (seg[1:] > 0)
    return {"inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
            "positions": np.array(window_pos)[:-1],
            "loss_mask": (same & (np.array(window_mask)[1:] > 0)).astype(np.float32)}


def _check_batches(batches, expected):
    for b, e in zip(batches, expected):
        for k in e:
            np.testing.assert_array_equal(b[k][0], e[k], err_msg=k)


def test_sft_samples_are_packed_whole_with_their_loss_mask(tmp_path):
    docs, masks = _sft_samples(40)
    write_data_dir(str(tmp_path), docs, docs[:2], shard_bytes=1 << 20, train_masks=masks,
                   val_masks=masks[:2])
    seq_len, width, pad = 16, 17, ByteTokenizer().pad_id
    # Reference: greedy packing; a sample that does not fit starts the next window.
    expected, cur = [], []

    def emit():
        toks = np.concatenate([docs[i] for i in cur])
        seg = np.concatenate([np.full(len(docs[i]), k + 1) for k, i in enumerate(cur)])
        pos = np.concatenate([np.arange(len(docs[i])) for i in cur])
        msk = np.concatenate([masks[i] for i in cur])
        n = width - len(toks)
        expected.append(_expected_example(
            np.pad(toks, (0, n), constant_values=pad), np.pad(seg, (0, n)), np.pad(pos, (0, n)),
            np.pad(msk, (0, n))))

    for i in range(len(docs)):
        if cur and sum(len(docs[j]) for j in cur) + len(docs[i]) > width:
            emit()
            cur = []
        cur.append(i)
    cfg = DataConfig(seq_len=seq_len, shuffle_buffer=0, cycle_length=1)
    ds = make_dataset(cfg, str(tmp_path), "train", batch_size=1, seed=0, training=False)
    batches = _windows(ds, len(expected))
    _check_batches(batches, expected)
    assert any((b["segment_ids"][0] == 0).any() for b in batches)  # padding happens
    assert any(b["segment_ids"][0].max() > 2 for b in batches)     # and real packing


def test_sliding_windows_with_stride(tmp_path):
    docs = synthetic_docs(12, min_len=3, max_len=40)
    write_data_dir(str(tmp_path), docs, docs[:2], shard_bytes=1 << 20)
    seq_len, stride, pad = 8, 3, ByteTokenizer().pad_id
    width, step = seq_len + 1, seq_len - stride
    expected = []
    for d in docs:
        k = 0
        while True:
            w = d[k * step:k * step + width]
            n = width - len(w)
            msk = np.ones(len(w), int)
            if k:
                msk[1:stride + 1] = 0  # overlapping targets are context only
            expected.append(_expected_example(
                np.pad(w, (0, n), constant_values=pad), np.pad(np.ones(len(w), int), (0, n)),
                np.pad(np.arange(len(w)), (0, n)), np.pad(msk, (0, n))))
            if k * step + width >= len(d):
                break
            k += 1
    cfg = DataConfig(seq_len=seq_len, stride=stride, packing="window", shuffle_buffer=0,
                     cycle_length=1)
    ds = make_dataset(cfg, str(tmp_path), "train", batch_size=1, seed=0, training=False)
    _check_batches(_windows(ds, len(expected)), expected)
    # Every token after a document's first is a target exactly once.
    assert sum(e["loss_mask"].sum() for e in expected) == sum(len(d) - 1 for d in docs)


@pytest.mark.parametrize("kind", ["token", "span"])
def test_input_masking_augmentation(stdlib_data, kind):
    cfg, data_dir, meta = stdlib_data
    pad = meta["tokenizer"]["pad_id"]
    plain = _windows(make_dataset(cfg, data_dir, "train", 8, seed=5), 12)
    aug_cfg = cfg.replace(augment=kind, mask_rate=0.15, mask_span=4)
    aug = _windows(make_dataset(aug_cfg, data_dir, "train", 8, seed=5), 12)
    again = _windows(make_dataset(aug_cfg, data_dir, "train", 8, seed=5), 12)
    masked = total = runs = 0
    for p, a, b in zip(plain, aug, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])       # deterministic
        for k in ("targets", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(a[k], p[k])                 # only inputs change
        changed = a["inputs"] != p["inputs"]
        assert (a["inputs"][changed] == pad).all()
        masked += changed.sum()
        total += changed.size
        runs += (changed[:, 1:] & ~changed[:, :-1]).sum() + changed[:, 0].sum()
    assert 0.12 < masked / total < 0.18, masked / total
    mean_run = masked / runs
    assert (mean_run < 1.3) if kind == "token" else (mean_run > 2.5), mean_run


def _corrupt_copy(src, dst, meta, mode):
    """Copies a data directory; flips a byte inside, or truncates, the second train shard."""
    os.makedirs(dst)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst)
    name = meta["splits"]["train"]["shards"][1]["file"]
    path = os.path.join(dst, name)
    data = bytearray(open(path, "rb").read())
    if mode == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize("mode", ["corrupt", "truncated"])
def test_a_bad_shard_is_one_error_naming_file_and_offset(tmp_path, mode):
    docs = synthetic_docs(60)
    meta = write_data_dir(str(tmp_path / "ok"), docs, docs[:2], shard_bytes=600)
    bad = _corrupt_copy(str(tmp_path / "ok"), str(tmp_path / "bad"), meta, mode)
    paths = shards.all_shard_paths(str(tmp_path / "bad"), meta)
    assert shards.find_corrupt_record(shards.all_shard_paths(str(tmp_path / "ok"), meta)) is None
    found = shards.find_corrupt_record(paths)
    assert found[0] == bad and found[1] == ("corrupted" if mode == "corrupt" else "truncated")
    # The pipeline (metadata read before the damage, as in a running job) fails loudly.
    cfg = DataConfig(seq_len=8, shuffle_buffer=0, cycle_length=1)
    ds = make_dataset(cfg, str(tmp_path / "bad"), "train", 2, seed=0, training=False,
                      metadata=meta)
    step = shards.guard_data_errors(tf.function(lambda it: next(it)), paths)
    it = iter(ds)
    with pytest.raises(UserError) as e:
        for _ in range(200):
            step(it)
    msg = str(e.value)
    assert bad in msg and f"byte offset {found[2]}" in msg and "\n" not in msg
