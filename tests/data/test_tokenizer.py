"""Byte tokenizer round trips."""

import numpy as np
import pytest

from deepseek_tf.config import UserError
from deepseek_tf.data.tokenizer import ByteTokenizer, load_tokenizer, make_tokenizer


@pytest.mark.parametrize("text", ["hello, world\n\tdef f(): pass", "深度求索 大语言模型",
                                  "emoji 🤖🚀 and ZWJ 👩‍💻", "", "\x00\x7f"])
def test_text_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_invalid_utf8_bytes_round_trip():
    tok = ByteTokenizer()
    raw = b"ok \xff\xfe\xc3 broken \xe4\xb8"
    ids = tok.encode(raw, add_bos=False, add_eos=False)
    assert ids.tolist() == list(raw)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")


def test_ids_are_in_range_and_specials_distinct():
    tok = ByteTokenizer()
    ids = tok.encode(bytes(range(256)))
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert all(i >= 256 for i in (tok.bos_id, tok.eos_id, tok.pad_id))
    assert tok.decode(np.array([tok.pad_id, 104, 105, tok.eos_id])) == "hi"


def test_save_and_load(tmp_path):
    tok = make_tokenizer("byte")
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown tokenizer"):
        make_tokenizer("nope")
