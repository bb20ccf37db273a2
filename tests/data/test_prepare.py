"""prepare: embedded corpus -> shards that read back exactly; atomic files; clear errors."""

import json
import os
import unicodedata

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DataConfig
from deepseek_tf.data import corpus, shards
from deepseek_tf.data.pipeline import _parser
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer
from deepseek_tf.errors import UserError


def _read_split(data_dir, meta, split):
    parse = _parser(meta["token_dtype"])
    out = []
    for path in shards.shard_paths(data_dir, meta, split):
        out += [parse(r).numpy() for r in tf.data.TFRecordDataset(path)]
    return out


def test_stdlib_corpus_is_found_and_sorted():
    files = corpus.stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert not any(f.startswith(("test/", "idlelib/")) or "site-packages" in f for f in files)


def test_validation_split_is_deterministic_by_name():
    names = [f"f{i}.py" for i in range(100)]
    val = corpus.validation_names(names, 0.1)
    assert len(val) == 10
    assert corpus.validation_names(list(reversed(names)), 0.1) == val
    assert len(corpus.validation_names(names, 3)) == 3
    assert corpus.validation_names(names, 0) == set()


def _cleaned_stdlib(max_samples):
    """The default cleaning, done independently: NFC, drop empty, drop exact copies."""
    kept, seen = [], set()
    for d in corpus.stdlib_documents(max_samples):
        text = unicodedata.normalize("NFC", d.data.decode("utf-8"))
        if text.strip() and text not in seen:
            seen.add(text)
            kept.append((d.name, text))
    return kept


def test_prepare_reads_back_exactly_the_tokens_written(stdlib_data):
    cfg, data_dir, meta = stdlib_data
    tok = ByteTokenizer()
    docs = _cleaned_stdlib(cfg.max_samples)
    assert len(docs) < cfg.max_samples  # the slice has empty / duplicate files to remove
    val = corpus.validation_names([name for name, _ in docs], cfg.val_size)
    expected = {"train": [tok.encode(t) for name, t in docs if name not in val],
                "validation": [tok.encode(t) for name, t in docs if name in val]}
    for split in shards.SPLITS:
        got = _read_split(data_dir, meta, split)
        assert len(got) == len(expected[split]) == meta["splits"][split]["documents"]
        for a, b in zip(got, expected[split]):
            np.testing.assert_array_equal(a, b)
        assert meta["splits"][split]["tokens"] == sum(len(x) for x in got)
    assert len(meta["splits"]["train"]["shards"]) > 1  # really sharded
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    for shard in meta["splits"]["train"]["shards"]:
        assert shard["sha256"] == shards.sha256_file(os.path.join(data_dir, shard["file"]))
    assert not [f for f in os.listdir(data_dir) if ".tmp" in f]  # no temp files left
    shards.read_metadata(data_dir, verify="sha256")


def test_prepare_twice_is_a_no_op_and_other_settings_are_refused(stdlib_data, tmp_path):
    cfg, data_dir, meta = stdlib_data
    assert prepare(cfg, data_dir, log=lambda *_: None) == meta
    with pytest.raises(UserError, match="other settings"):
        prepare(cfg.replace(val_size=5), data_dir, log=lambda *_: None)


def test_interrupted_prepare_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = shards.ShardWriter.add

    def failing_add(self, tokens, loss_mask=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        real_add(self, tokens, loss_mask)

    monkeypatch.setattr(shards.ShardWriter, "add", failing_add)
    out = str(tmp_path / "d")
    with pytest.raises(KeyboardInterrupt):
        prepare(DataConfig(max_samples=20, shard_size_mb=0.05), out, log=lambda *_: None)
    finished = [f for f in os.listdir(out) if f.endswith(".tfrecord") and not f.startswith(".")]
    # Every file with a final name is complete: it parses to the end.
    for name in finished:
        assert sum(1 for _ in tf.data.TFRecordDataset(os.path.join(out, name))) > 0
    assert not os.path.exists(os.path.join(out, shards.METADATA_FILE))
    with pytest.raises(UserError, match="no metadata.json"):
        shards.read_metadata(out)


def test_read_metadata_errors(stdlib_data, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        shards.read_metadata(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.json").write_text("{oops")
    with pytest.raises(UserError, match="cannot read"):
        shards.read_metadata(str(tmp_path / "bad"))
    # A truncated shard is caught by its recorded size.
    _, data_dir, meta = stdlib_data
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in os.listdir(data_dir):
        data = open(os.path.join(data_dir, f), "rb").read()
        if f == meta["splits"]["train"]["shards"][0]["file"]:
            data = data[: len(data) // 2]
        (copy / f).write_bytes(data)
    with pytest.raises(UserError, match="truncated"):
        shards.read_metadata(str(copy))
    m = json.loads((copy / "metadata.json").read_text())
    assert m["version"] == shards.METADATA_VERSION


def test_interrupted_prepare_resumes_and_skips_finished_shards(tmp_path, monkeypatch):
    cfg = DataConfig(max_samples=30, shard_size_mb=0.02, val_size=3)
    quiet = lambda *_: None  # noqa: E731
    reference = prepare(cfg, str(tmp_path / "ref"), log=quiet)
    n_docs = sum(reference["splits"][s]["documents"] for s in shards.SPLITS)
    added = []
    real_add = shards.ShardWriter.add

    def counting_add(self, tokens, loss_mask=None):
        added.append(self.split)
        if stop_at and len(added) == stop_at:
            raise KeyboardInterrupt
        real_add(self, tokens, loss_mask)

    monkeypatch.setattr(shards.ShardWriter, "add", counting_add)
    out = str(tmp_path / "d")
    stop_at = 20
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, out, log=quiet)
    finished = sorted(f for f in os.listdir(out) if f.endswith(".tfrecord") and f[0] != ".")
    assert finished and not os.path.exists(os.path.join(out, shards.METADATA_FILE))
    stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in finished}
    done_docs = sum(1 for f in finished for _ in tf.data.TFRecordDataset(os.path.join(out, f)))
    added.clear()
    stop_at = 0
    msgs = []
    meta = prepare(cfg, out, log=msgs.append)
    assert any("resuming" in m for m in msgs)
    # Only the documents of unfinished shards were tokenized and written again.
    assert len(added) == n_docs - done_docs
    assert all(os.stat(os.path.join(out, f)).st_mtime_ns == stamps[f] for f in finished)
    for split in shards.SPLITS:
        assert meta["splits"][split]["shards"] == reference["splits"][split]["shards"]
    assert meta["report"]["counts"] == reference["report"]["counts"]
    assert not os.path.exists(os.path.join(out, ".stage"))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_metadata_has_counts_histogram_and_report(stdlib_data):
    cfg, data_dir, meta = stdlib_data
    train = meta["splits"]["train"]
    hist = train["length_histogram"]
    assert sum(hist["counts"]) == train["documents"]
    assert len(hist["bin_edges"]) == len(hist["counts"]) + 1
    report = json.load(open(os.path.join(data_dir, "report.json")))
    assert report == meta["report"]
    counts, removed = report["counts"], report["removed"]
    assert counts["documents_in"] == cfg.max_samples
    assert counts["documents_in"] - sum(removed.values()) == counts["documents_out"]
    assert counts["documents_out"] == sum(meta["splits"][s]["documents"] for s in shards.SPLITS)
    assert counts["tokens_out"] == sum(meta["splits"][s]["tokens"] for s in shards.SPLITS)
    assert meta["kind"] == "text" and meta["features"] == ["tokens"]
