"""Tokenizers: byte, SentencePiece (trained here; in-graph == Python), HF tokenizer.json."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DataConfig, TokenizerConfig
from deepseek_tf.data.corpus import stdlib_documents
from deepseek_tf.data.prepare import prepare
from deepseek_tf.errors import UserError
from deepseek_tf.data.tokenizer import (ByteTokenizer, build_tokenizer, copy_tokenizer,
                                        load_tokenizer, make_tokenizer)
from deepseek_tf.data.tokenizer.hf import HFTokenizer
from deepseek_tf.data.tokenizer.spm import SentencePieceTokenizer
from tests.helpers.corpora import DOCS, HF_SPECIALS, build_hf_tokenizer, read_split, write_jsonl

TEXTS = ["hello, world\n\tdef f(): pass", "深度求索 大语言模型", "emoji 🤖🚀 and ZWJ 👩‍💻", "",
         "  leading and trailing spaces  ", "line\r\nwindows\n\n\nblank lines", "x = 1  # 99"]


@pytest.fixture(scope="module")
def training_texts():
    return [d.data.decode("utf-8") for d in stdlib_documents(40)] + DOCS


@pytest.fixture(scope="module")
def spm_tok(training_texts):
    return SentencePieceTokenizer.train(training_texts, vocab_size=600,
                                        user_symbols=("<|im_start|>", "<|im_end|>"),
                                        log=lambda *_: None)


# ---------------------------------------------------------------- byte

@pytest.mark.parametrize("text", TEXTS)
def test_byte_text_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_byte_invalid_utf8_bytes_round_trip():
    tok = ByteTokenizer()
    raw = b"ok \xff\xfe\xc3 broken \xe4\xb8"
    ids = tok.encode(raw, add_bos=False, add_eos=False)
    assert ids.tolist() == list(raw)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")


def test_byte_ids_are_in_range_and_specials_distinct():
    tok = ByteTokenizer()
    ids = tok.encode(bytes(range(256)))
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert all(i >= 256 for i in (tok.bos_id, tok.eos_id, tok.pad_id))
    assert tok.decode(np.array([tok.pad_id, 104, 105, tok.eos_id])) == "hi"


def test_byte_in_graph_equals_python():
    tok = ByteTokenizer()
    tft = tok.tf_tokenizer()
    ragged = tft.tokenize(tf.constant(TEXTS))
    for text, row in zip(TEXTS, ragged.to_list()):
        assert row == tok.encode(text, add_bos=False, add_eos=False).tolist()
    assert [t.decode() for t in tft.detokenize(ragged).numpy()] == TEXTS


def test_save_and_load(tmp_path):
    tok = make_tokenizer("byte")
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown tokenizer"):
        make_tokenizer("nope")


# ---------------------------------------------------------------- sentencepiece

@pytest.mark.parametrize("text", TEXTS + DOCS)
def test_sentencepiece_round_trip_is_lossless(spm_tok, text):
    ids = spm_tok.encode(text)
    assert ids[0] == spm_tok.bos_id == 1 and ids[-1] == spm_tok.eos_id == 2
    assert 0 not in ids.tolist()  # byte fallback: nothing is unknown
    assert spm_tok.decode(ids) == text


def test_sentencepiece_in_graph_equals_python(spm_tok):
    texts = TEXTS + DOCS
    tft = spm_tok.tf_tokenizer()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(strings):  # a graph, as a SavedModel signature would run it
        return tft.tokenize(strings)

    ragged = tokenize(tf.constant(texts))
    for text, row in zip(texts, ragged.to_list()):
        assert row == spm_tok.encode(text, add_bos=False, add_eos=False).tolist()
    assert [t.decode() for t in tft.detokenize(ragged).numpy()] == texts


def test_sentencepiece_training_is_deterministic_and_keeps_markers(spm_tok, training_texts):
    again = SentencePieceTokenizer.train(training_texts, vocab_size=600,
                                         user_symbols=("<|im_start|>", "<|im_end|>"),
                                         log=lambda *_: None)
    assert again.model_proto == spm_tok.model_proto
    for marker in ("<|im_start|>", "<|im_end|>", "\n"):
        assert len(spm_tok.encode(marker, add_bos=False, add_eos=False)) == 1
    assert spm_tok.vocab_size == 600 and spm_tok.pad_id == 3


def test_sentencepiece_save_load_and_errors(spm_tok, tmp_path):
    spm_tok.save(str(tmp_path / "t"))
    assert sorted(os.listdir(tmp_path / "t")) == ["tokenizer.model", "tokenizer_config.json"]
    back = copy_tokenizer(str(tmp_path / "t"), str(tmp_path / "copy"))
    assert back.fingerprint == spm_tok.fingerprint and back.encode("abc").tolist() == \
        spm_tok.encode("abc").tolist()
    (tmp_path / "t" / "tokenizer.model").write_bytes(b"x" + spm_tok.model_proto[1:])
    with pytest.raises(UserError):
        load_tokenizer(str(tmp_path / "t"))
    with pytest.raises(UserError, match="SentencePiece training failed.*vocab_size"):
        SentencePieceTokenizer.train(["tiny corpus"] * 3, vocab_size=5000, log=lambda *_: None)


def test_prepare_trains_sentencepiece_on_the_corpus(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS * 3] +
                       [{"text": d.data.decode()} for d in stdlib_documents(15)])
    out = str(tmp_path / "out")
    meta = prepare(DataConfig(inputs=path, val_size=0, dedup_exact=False), out,
                   TokenizerConfig(type="sentencepiece", vocab_size=500), log=lambda *_: None)
    tok = load_tokenizer(out)
    assert isinstance(tok, SentencePieceTokenizer) and meta["tokenizer"]["vocab_size"] == 500
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    got = [tok.decode(ids) for ids, _ in read_split(out, meta)]
    assert got[:len(DOCS)] == DOCS
    # A given .model file is used as is.
    tok2 = build_tokenizer(TokenizerConfig(type="sentencepiece",
                                           path=os.path.join(out, "tokenizer.model")))
    assert tok2.fingerprint == tok.fingerprint


# ---------------------------------------------------------------- HF tokenizer.json

@pytest.fixture(scope="module")
def hf_dir(training_texts, tmp_path_factory):
    return build_hf_tokenizer(str(tmp_path_factory.mktemp("hf")), training_texts)


def test_hf_tokenizer_json_round_trips(hf_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    tok = HFTokenizer.from_path(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
        reference.token_to_id(t) for t in HF_SPECIALS[:3])
    for text in TEXTS + DOCS:
        body = tok.encode(text, add_bos=False, add_eos=False)
        assert body.tolist() == reference.encode(text, add_special_tokens=False).ids
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    # Added special tokens (chat markers) are single ids.
    assert tok.encode("<｜User｜>hi", add_bos=False, add_eos=False)[0] == \
        reference.token_to_id("<｜User｜>")
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)


def test_hf_tokenizer_save_load_and_errors(hf_dir, tmp_path):
    tok = HFTokenizer.from_path(os.path.join(hf_dir, "tokenizer.json"))
    tok.save(str(tmp_path / "saved"))
    back = load_tokenizer(str(tmp_path / "saved"))
    assert isinstance(back, HFTokenizer) and back.fingerprint == tok.fingerprint
    saved = json.load(open(tmp_path / "saved" / "tokenizer_config.json"))
    assert saved["eos_token"] == HF_SPECIALS[1] and saved["type"] == "hf"
    bare = build_hf_tokenizer(str(tmp_path / "bare"), DOCS, vocab_size=300, with_config=False)
    with pytest.raises(UserError, match="no EOS token"):
        HFTokenizer.from_path(bare)
    no_bos = HFTokenizer.from_path(bare, eos_token=HF_SPECIALS[1])
    assert no_bos.bos_id == -1 and no_bos.encode("a")[0] != no_bos.eos_id
    with pytest.raises(UserError, match="not in the vocabulary"):
        HFTokenizer.from_path(bare, eos_token="<nope>")
    with pytest.raises(UserError, match="cannot read HF tokenizer"):
        HFTokenizer.from_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="in-graph|TensorFlow graph"):
        tok.tf_tokenizer()


def test_prepare_with_an_hf_tokenizer(hf_dir, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS])
    out = str(tmp_path / "out")
    meta = prepare(DataConfig(inputs=path, val_size=0), out,
                   TokenizerConfig(type="hf", path=hf_dir), log=lambda *_: None)
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer) and sorted(os.listdir(out)) == [
        "metadata.json", "report.json", "tokenizer.json", "tokenizer_config.json",
        "train-00000.tfrecord"]
    assert [tok.decode(ids) for ids, _ in read_split(out, meta)] == DOCS
