"""Ingest: every input format round-trips; bad input is counted, listed, skipped or fatal."""

import json
import os

import pytest

from deepseek_tf.config import DataConfig, UserError
from deepseek_tf.data import ingest
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer
from tests.helpers.corpora import DOCS, read_split, write_format, write_jsonl

quiet = lambda *_: None  # noqa: E731


def _prepare(tmp_path, inputs, **kw):
    cfg = DataConfig(inputs=inputs, val_size=0, shard_size_mb=64, **kw)
    out = str(tmp_path / "out")
    return out, prepare(cfg, out, log=quiet)


@pytest.mark.parametrize("fmt", ["txt_dir", "jsonl", "json_array", "csv", "parquet",
                                 "save_to_disk"])
def test_each_format_round_trips(tmp_path, fmt):
    path = write_format(str(tmp_path / "in"), fmt)
    out, meta = _prepare(tmp_path, path)
    tok = ByteTokenizer()
    got = [tok.decode(ids) for ids, _ in read_split(out, meta)]
    assert got == DOCS  # exact text, input order (one shard, no validation split)
    assert meta["report"]["counts"]["documents_in"] == len(DOCS)
    assert meta["report"]["bad_input"]["count"] == 0


def test_sources_are_found_in_sorted_order_with_stable_names(tmp_path):
    root = write_format(str(tmp_path), "txt_dir")
    write_jsonl(os.path.join(root, "a", "z.jsonl"), [{"text": "x"}])
    sources = ingest.find_sources((root,), (".txt", ".md", ".py"))
    names = [s.name for s in sources]
    assert names == sorted(names) and "ignored.bin" not in " ".join(names)
    assert names[0] == "a/doc00.txt" and "a/z.jsonl" in names
    records = [r for r in ingest.read_sources(sources) if isinstance(r, ingest.Record)]
    assert records[names.index("a/z.jsonl")].name == "a/z.jsonl:1"
    with pytest.raises(UserError, match="does not exist"):
        ingest.find_sources((str(tmp_path / "nope"),), (".txt",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable files"):
        ingest.find_sources((str(tmp_path / "empty"),), (".txt",))


def test_text_field_and_max_samples(tmp_path):
    path = write_format(str(tmp_path / "in"), "jsonl", field="content")
    out, meta = _prepare(tmp_path, path, text_field="content", max_samples=3)
    tok = ByteTokenizer()
    assert [tok.decode(ids) for ids, _ in read_split(out, meta)] == DOCS[:3]


def _bad_inputs(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "good one"}], raw_lines=[
        b'{"text": "broken',                       # line 2: malformed JSON
        b'{"other": "no text field"}',             # line 3: missing field
        b'{"text": "bad byte \xff here"}',         # line 4: undecodable
        b"",                                       # line 5: blank, ignored
        b'["not", "an object"]',                   # line 6
        b'{"text": "good two"}'])                  # line 7
    (d / "b.txt").write_bytes(b"fine first line\nsecond \xc3\x28 line\n")  # invalid UTF-8, line 2
    return str(d)


def test_bad_input_is_counted_and_listed_by_file_and_line(tmp_path):
    d = _bad_inputs(tmp_path)
    out, meta = _prepare(tmp_path, d)
    bad = meta["report"]["bad_input"]
    a, b = os.path.join(d, "a.jsonl"), os.path.join(d, "b.txt")
    assert [item.split(": ")[0] for item in bad["items"]] == [
        f"{a}:2", f"{a}:3", f"{a}:4", f"{a}:6", f"{b}:2"]
    assert bad["by_kind"] == {"malformed_json": 2, "missing_field": 1, "undecodable": 2}
    assert "missing field 'text'" in bad["items"][1]
    tok = ByteTokenizer()
    assert [tok.decode(ids) for ids, _ in read_split(out, meta)] == ["good one", "good two"]
    assert json.load(open(os.path.join(out, "report.json")))["bad_input"] == bad


def test_on_error_fail_names_the_first_bad_line(tmp_path):
    d = _bad_inputs(tmp_path)
    with pytest.raises(UserError, match=r"a\.jsonl:2: malformed JSON.*on_error=fail"):
        _prepare(tmp_path, d, on_error="fail")
    assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_malformed_json_array_is_one_bad_input(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "arr.json").write_text('[{"text": "a"},\n {"text": "b",,}]')
    out, meta = _prepare(tmp_path, f"{tmp_path / 'arr.json'},{tmp_path / 'good.jsonl'}")
    assert meta["report"]["bad_input"]["items"][0].startswith(f"{tmp_path / 'arr.json'}:2: ")
    assert meta["report"]["counts"]["documents_out"] == 1


def test_an_empty_result_is_an_error_not_an_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "   "}, {"text": ""}])
    with pytest.raises(UserError, match="no documents left"):
        _prepare(tmp_path, path)
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert report["removed"]["too_short"] == 2
    assert not os.path.exists(tmp_path / "out" / "metadata.json")
