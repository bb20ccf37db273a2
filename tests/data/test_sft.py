"""SFT formats (alpaca / sharegpt): parsing, prepare end to end with loss masks."""

import json
import os

import numpy as np
import pytest

from deepseek_tf.config import DataConfig, TokenizerConfig
from deepseek_tf.data import sft
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer import ByteTokenizer, load_tokenizer
from deepseek_tf.data.tokenizer.hf import HFTokenizer
from tests.helpers.corpora import DOCS, HF_SPECIALS, build_hf_tokenizer, read_split, write_jsonl

quiet = lambda *_: None  # noqa: E731


def test_parse_alpaca():
    c = sft.parse_record({"instruction": "Sum", "input": "1 2", "output": "3", "system": "S",
                          "history": [["hi", "hello"]]}, "alpaca")
    assert c == sft.Conversation("S", "", (("user", "hi"), ("assistant", "hello"),
                                           ("user", "Sum\n1 2"), ("assistant", "3")))
    assert sft.parse_record({"instruction": "I", "output": "O", "input": None},
                            "alpaca").messages == (("user", "I"), ("assistant", "O"))


def test_parse_sharegpt_roles_system_and_tools():
    c = sft.parse_record({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "q"},
        {"from": "function_call", "value": "call"}, {"from": "observation", "value": "r"},
        {"from": "gpt", "value": "a"}], "tools": [{"name": "f"}]}, "sharegpt")
    assert c == sft.Conversation("S", '[{"name": "f"}]', (
        ("user", "q"), ("function_call", "call"), ("observation", "r"), ("assistant", "a")))
    openai = sft.parse_record({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}],
                               "system": "top"}, "sharegpt")
    assert openai == sft.Conversation("top", "", (("user", "q"), ("assistant", "a")))


@pytest.mark.parametrize("record,fmt,needle", [
    ({"instruction": "I"}, "alpaca", "missing field 'output'"),
    ({"output": "O"}, "alpaca", "missing field 'instruction'"),
    ({"instruction": "I", "output": "O", "history": [["only one"]]}, "alpaca", "history"),
    ({"instruction": 3, "output": "O"}, "alpaca", "not text"),
    ({}, "sharegpt", "missing field 'conversations'"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "sharegpt", "must alternate"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "must end"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "sharegpt", "unknown role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
     "sharegpt", "must come first"),
])
def test_bad_samples(record, fmt, needle):
    with pytest.raises(sft.BadSample, match=needle):
        sft.parse_record(record, fmt)


ALPACA = [
    {"instruction": "Say hi", "output": "hi"},
    {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "You add."},
    {"instruction": "no output here"},                                    # bad: line 4
    {"instruction": "Long", "output": "x" * 300},                         # cut at the right
    {"instruction": "Chat", "output": "second", "history": [["first", "reply " * 20]]},
    {"instruction": "Say hi", "output": "hi"},                            # exact duplicate
]


def test_prepare_alpaca_end_to_end(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ALPACA) + "\n]\n")
    cfg = DataConfig(inputs=str(path), format="alpaca", template="chatml", cutoff_len=120,
                     seq_len=128, val_size=0)
    out = str(tmp_path / "out")
    meta = prepare(cfg, out, log=quiet)
    tok = ByteTokenizer()
    records = [ALPACA[i] for i in (0, 1, 3, 4)]
    expected = [sft.encode(sft.parse_record(r, "alpaca"), TEMPLATES["chatml"], tok, 120)
                for r in records]
    got = read_split(out, meta)
    assert len(got) == 4
    for (ids, mask), (want_ids, want_mask, _) in zip(got, expected):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
    assert len(got[2][0]) == 120 and got[2][1][-1] == 1          # cut, still trained
    assert tok.decode(got[3][0]).startswith("<|im_start|>user\nChat")  # history dropped
    report = meta["report"]
    assert report["bad_input"]["items"] == [f"{path}:4: missing field 'output'"]
    assert report["truncated"] == {"turns_dropped": 1, "cut": 1}
    assert report["removed"]["exact_duplicate"] == 1
    assert meta["kind"] == "sft" and meta["features"] == ["tokens", "loss_mask"]
    assert meta["template"]["name"] == "chatml" and meta["template"]["stop"] == "<|im_end|>"
    assert report["counts"]["target_tokens_out"] == sum(int(m[1:].sum()) for _, m in got)


def test_prepare_sharegpt_with_an_hf_tokenizer_and_mask_history(tmp_path):
    hf = build_hf_tokenizer(str(tmp_path / "hf"), DOCS * 5)
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"},
                               {"from": "gpt", "value": f"a{i}"},
                               {"from": "human", "value": "more"},
                               {"from": "gpt", "value": f"b{i}"}]} for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows, raw_lines=[b"{not json"])
    out = str(tmp_path / "out")
    meta = prepare(DataConfig(inputs=path, format="sharegpt", mask_history=True, val_size=2),
                   out, TokenizerConfig(type="hf", path=hf), log=quiet)
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer)
    user, assistant = (tok.tk.token_to_id(t) for t in HF_SPECIALS[3:5])
    samples = read_split(out, meta, "train") + read_split(out, meta, "validation")
    assert len(samples) == 6 and meta["splits"]["validation"]["documents"] == 2
    for ids, mask in samples:
        assert ids[0] == tok.bos_id and ids.tolist().count(user) == 2
        assert ids.tolist().count(assistant) == 2 and ids[-1] == tok.eos_id
        trained = tok.decode(ids[mask == 1])
        assert trained.startswith("b") and len(trained) == 2  # only the last answer (+ EOS)
    assert meta["report"]["bad_input"]["by_kind"] == {"malformed_json": 1}


def test_prepare_sft_with_sentencepiece_keeps_template_markers(tmp_path):
    rows = [{"instruction": f"question {i} " + DOCS[i % len(DOCS)], "output": f"answer {i}"}
            for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    out = str(tmp_path / "out")
    prepare(DataConfig(inputs=path, format="alpaca", template="deepseek3", val_size=0), out,
            TokenizerConfig(type="sentencepiece", vocab_size=400), log=quiet)
    tok = load_tokenizer(out)
    for marker in TEMPLATES["deepseek3"].markers:
        assert len(tok.encode(marker, add_bos=False, add_eos=False)) == 1, marker
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
