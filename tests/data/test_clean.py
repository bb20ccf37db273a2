"""Cleaning steps: normalization, regex replace / drop, length filters, and their report."""

import re

from deepseek_tf.config import DataConfig
from deepseek_tf.data.clean import Cleaner
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer
from tests.helpers.corpora import read_split, write_jsonl


def test_unicode_normalization():
    decomposed = "Cafe\u0301 \ufb01 \u2460"          # e + combining acute, "fi" ligature, circled 1
    assert Cleaner(normalize="NFC").clean(decomposed) == ("Caf\u00e9 \ufb01 \u2460",
                                                          ["normalized"])
    assert Cleaner(normalize="NFKC").clean(decomposed)[0] == "Caf\u00e9 fi 1"
    assert Cleaner(normalize="none").clean(decomposed) == (decomposed, [])
    assert Cleaner(normalize="NFC").clean("already NFC") == ("already NFC", [])


def test_regex_replace_and_drop_and_lengths():
    c = Cleaner(replace=re.compile(r"\S+@\S+"), replacement="<email>",
                drop=re.compile(r"(?i)lorem ipsum"), min_chars=5, max_chars=40)
    assert c.clean("mail bob@example.com now") == ("mail <email> now", ["replaced"])
    assert c.reject("Lorem Ipsum dolor sit") == "drop_regex"
    assert c.reject("  abc \n") == "too_short"          # whitespace does not count
    assert c.reject("x" * 41) == "too_long"
    assert c.reject("just right") is None


def test_prepare_applies_and_reports_every_step(tmp_path):
    docs = ["keep me, I am fine",                       # kept
            "Cafe\u0301 au lait",                       # normalized, kept
            "write to bob@example.com please",         # replaced, kept
            "SPAM SPAM buy now",                       # drop_regex
            "tiny",                                    # too_short
            "x" * 100,                                 # too_long
            "keep me, I am fine"]                      # exact duplicate
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    cfg = DataConfig(inputs=path, val_size=0, replace_regex=r"\S+@\S+", replacement="<email>",
                     drop_regex="SPAM", min_chars=5, max_chars=60)
    out = str(tmp_path / "out")
    meta = prepare(cfg, out, log=lambda *_: None)
    report = meta["report"]
    assert report["counts"]["documents_in"] == 7
    assert report["counts"]["normalized"] == 1 and report["counts"]["replaced"] == 1
    assert report["removed"] == {"drop_regex": 1, "too_short": 1, "too_long": 1,
                                 "exact_duplicate": 1, "near_duplicate": 0, "perplexity": 0,
                                 "no_target": 0}
    tok = ByteTokenizer()
    assert [tok.decode(ids) for ids, _ in read_split(out, meta)] == [
        "keep me, I am fine", "Caf\u00e9 au lait", "write to <email> please"]
