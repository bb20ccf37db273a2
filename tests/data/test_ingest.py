"""Ingest: every input format round-trips; bad input is counted, listed, skipped or fatal."""

import json
import os

import pytest

from deepseek_tf.config import DataConfig
from deepseek_tf.data import ingest
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer
from deepseek_tf.errors import UserError
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


def _alpaca_rows(n):
    return [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)]


def test_one_line_json_array_splits_like_the_same_records_as_json_lines(tmp_path):
    """`json.dump(rows, f)` puts every record on line 1: records are named by index, so
    the hash split matches JSON Lines (one record per line) record for record."""
    rows = _alpaca_rows(60)
    (tmp_path / "array").mkdir()
    (tmp_path / "lines").mkdir()
    with open(tmp_path / "array" / "rows.json", "w") as f:
        json.dump(rows, f)
    with open(tmp_path / "lines" / "rows.json", "w") as f:  # not `[`: read as JSON Lines
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got = {}
    for kind in ("array", "lines"):
        cfg = DataConfig(inputs=str(tmp_path / kind / "rows.json"), format="alpaca",
                         template="chatml", seq_len=64, val_size=6, shard_size_mb=64)
        out = str(tmp_path / f"out-{kind}")
        meta = prepare(cfg, out, log=quiet)
        got[kind] = {s: [ids.tolist() for ids, _ in read_split(out, meta, s)]
                     for s in ("train", "validation")}
    assert len(got["array"]["validation"]) == 6 and len(got["array"]["train"]) == 54
    assert got["array"] == got["lines"]


def test_records_sharing_one_name_say_why_no_training_documents(tmp_path, monkeypatch):
    real = ingest._read_json_array

    def one_name(src, data):  # as the old reader named them: every record `file:1`
        for item in real(src, data):
            yield ingest.Record(f"{src.name}:1", item.where, item.value)

    monkeypatch.setattr(ingest, "_read_json_array", one_name)
    path = tmp_path / "rows.json"
    with open(path, "w") as f:
        json.dump(_alpaca_rows(40), f)
    cfg = DataConfig(inputs=str(path), format="alpaca", template="chatml", seq_len=64,
                     val_size=4, shard_size_mb=64)
    with pytest.raises(UserError, match=r"all 40 records share one name \(rows.json:1\)"):
        prepare(cfg, str(tmp_path / "out"), log=quiet)
