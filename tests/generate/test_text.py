"""The chat profile: one function decides a run's template and stops for the generate CLI,
evaluate, the SavedModel and the .litertlm export."""

import dataclasses

import pytest

from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.errors import UserError
from deepseek_tf.generate.text import chat_profile, chat_prompt_ids, prompt_ids
from tests.helpers import tiny

TOK = ByteTokenizer()
IM_END = tuple(TOK.encode("<|im_end|>", add_bos=False, add_eos=False).tolist())


def _exp(**data):
    return tiny.experiment("x", data=data)


def test_a_chatml_sft_run_stops_at_im_end_as_a_token_sequence():
    p = chat_profile(_exp(format="alpaca", template="chatml"), TOK)
    assert p.template is TEMPLATES["chatml"]
    assert p.stops == ((TOK.eos_id,), IM_END) and len(IM_END) == 10
    assert p.stop_strings == ("<|im_end|>",) and p.stop_ids == (TOK.eos_id,)


def test_a_dpo_run_keeps_its_template():
    exp = _exp(template="chatml")
    exp = dataclasses.replace(exp, train=exp.train.replace(stage="dpo"))
    assert chat_profile(exp, TOK).template is TEMPLATES["chatml"]


def test_a_pretraining_run_is_plain_text_unless_asked():
    exp = _exp(template="chatml")
    assert chat_profile(exp, TOK).template is None
    assert chat_profile(exp, TOK).stops == ((TOK.eos_id,),)
    assert chat_profile(exp, TOK, chat=True).template is TEMPLATES["chatml"]  # generate --chat
    assert chat_profile(exp, TOK, "plain").template is TEMPLATES["plain"]     # evaluate
    sft = _exp(format="alpaca", template="chatml")
    assert chat_profile(sft, TOK, "plain", chat=False).template is None        # generate
    with pytest.raises(UserError, match="--template='nope' is not one of"):
        chat_profile(exp, TOK, "nope")


def test_chat_prompt_ids_render_conversations_like_training():
    t = TEMPLATES["chatml"]
    ids = chat_prompt_ids([("system", "S"), ("user", "Q1"), ("assistant", "A1"),
                           ("user", "Q2")], TOK, t)
    assert TOK.decode(ids) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1"
                               "<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                               "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    for t in TEMPLATES.values():
        assert chat_prompt_ids([("user", "Hi")], TOK, t).tolist() == \
            prompt_ids("Hi", TOK, t).tolist()
