"""prepare: embedded corpus -> shards that read back exactly; atomic files; clear errors."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DataConfig, UserError
from deepseek_tf.data import corpus, shards
from deepseek_tf.data.pipeline import _parser
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer


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


def test_prepare_reads_back_exactly_the_tokens_written(stdlib_data):
    cfg, data_dir, meta = stdlib_data
    tok = ByteTokenizer()
    docs = list(corpus.stdlib_documents(cfg.max_documents))
    val = corpus.validation_names([d.name for d in docs], cfg.val_size)
    expected = {"train": [tok.encode(d.data) for d in docs if d.name not in val],
                "validation": [tok.encode(d.data) for d in docs if d.name in val]}
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

    def failing_add(self, tokens):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        real_add(self, tokens)

    monkeypatch.setattr(shards.ShardWriter, "add", failing_add)
    out = str(tmp_path / "d")
    with pytest.raises(KeyboardInterrupt):
        prepare(DataConfig(max_documents=20, shard_size_mb=0.05), out, log=lambda *_: None)
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
