"""Chat templates render known conversations to the exact expected token / mask layout."""

import numpy as np
import pytest

from deepseek_tf.data.sft import Conversation, encode, render_text
from deepseek_tf.data.templates import TEMPLATES, split_reasoning
from deepseek_tf.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS = "<BOS>", "<EOS>"


def layout(segments):
    """[(text | BOS | EOS, mask)] -> (ids, mask) with the byte tokenizer."""
    ids, mask = [], []
    for text, m in segments:
        seg = [TOK.bos_id] if text == BOS else [TOK.eos_id] if text == EOS else \
            TOK.encode(text, add_bos=False, add_eos=False).tolist()
        ids += seg
        mask += [m] * len(seg)
    return np.array(ids, np.int32), np.array(mask, np.uint8)


def conv(a1="A1", a2="A2", system="S"):
    return Conversation(system, "", (("user", "Q1"), ("assistant", a1), ("user", "Q2"),
                                     ("assistant", a2)))


EXPECTED = {
    "deepseek3": [(BOS, 0), ("S<｜User｜>Q1<｜Assistant｜>", 0), ("A1", 1), (EOS, 1),
                  ("<｜User｜>Q2<｜Assistant｜>", 0), ("A2", 1), (EOS, 1)],
    "chatml": [("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                "<|im_start|>assistant\n", 0), ("A1<|im_end|>", 1),
               ("\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", 0),
               ("A2<|im_end|>", 1)],
    "plain": [(BOS, 0), ("S\n\nUser: Q1\n\nAssistant: ", 0), ("A1", 1), (EOS, 1),
              ("\n\nUser: Q2\n\nAssistant: ", 0), ("A2", 1), (EOS, 1)],
}


def _check(c, template, expected, **kw):
    ids, mask, info = encode(c, TEMPLATES[template], TOK, cutoff_len=4096, **kw)
    want_ids, want_mask = layout(expected)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    return info


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_template_layouts(template):
    assert _check(conv(), template, EXPECTED[template]) == {"turns_dropped": 0, "cut": 0}


def test_deepseek_r1_keeps_only_the_last_reasoning():
    c = conv(a1="<think>\nfirst thoughts\n</think>\n\nA1", a2="<think>\nR2\n</think>\n\nA2")
    _check(c, "deepseek-r1", [
        (BOS, 0), ("S<｜User｜>Q1<｜Assistant｜>", 0), ("A1", 1), (EOS, 1),
        ("<｜User｜>Q2<｜Assistant｜><think>\n", 0), ("R2\n</think>\n\nA2", 1), (EOS, 1)])
    # Without reasoning the think block is empty (what R1's prompt makes it generate).
    _check(conv(system=""), "deepseek-r1", [
        (BOS, 0), ("<｜User｜>Q1<｜Assistant｜>", 0), ("A1", 1), (EOS, 1),
        ("<｜User｜>Q2<｜Assistant｜><think>\n", 0), ("\n</think>\n\nA2", 1), (EOS, 1)])
    assert split_reasoning("<think>r</think>\n\nanswer") == ("r", "answer")
    assert split_reasoning("no think") == ("", "no think")


def test_train_on_prompt_and_mask_history():
    full = EXPECTED["deepseek3"]
    _check(conv(), "deepseek3", [(t, 1) for t, _ in full], train_on_prompt=True)
    history_masked = [(t, 0 if t in ("A1",) or (t == EOS and i == 3) else m)
                      for i, (t, m) in enumerate(full)]
    assert [m for _, m in history_masked] == [0, 0, 0, 0, 0, 1, 1]
    _check(conv(), "deepseek3", history_masked, mask_history=True)
    both = [(t, 0 if i in (2, 3) else 1) for i, (t, _) in enumerate(full)]
    _check(conv(), "deepseek3", both, train_on_prompt=True, mask_history=True)


def test_tools_function_calls_and_observations():
    c = Conversation("S", '[{"name": "f"}]', (
        ("user", "Q"), ("function_call", '{"name": "f"}'), ("observation", "42"),
        ("assistant", "A")))
    _check(c, "deepseek3", [
        (BOS, 0), ('S\n\n## Tools\nYou have access to the following tools:\n[{"name": "f"}]'
                   "<｜User｜>Q<｜Assistant｜>", 0),
        ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{"name": "f"}<｜tool▁call▁end｜>'
         "<｜tool▁calls▁end｜>", 1), (EOS, 1),
        ("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>42<｜tool▁output▁end｜>"
         "<｜tool▁outputs▁end｜>", 0), ("A", 1), (EOS, 1)])
    _check(c, "chatml", [
        ("<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist "
         'with the user query.\n\n<tools>\n[{"name": "f"}]\n</tools><|im_end|>\n'
         "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", 0),
        ('<tool_call>\n{"name": "f"}\n</tool_call><|im_end|>', 1),
        ("\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("A<|im_end|>", 1)])


def test_truncation_policy():
    t = TEMPLATES["plain"]
    last_turn = [(BOS, 0), ("S\n\nUser: Q2\n\nAssistant: ", 0), ("A2", 1), (EOS, 1)]
    want_ids, want_mask = layout(last_turn)
    full_len = len(layout(EXPECTED["plain"])[0])
    # 1. Too long: the oldest turn goes, the system text and the last turn stay.
    ids, mask, info = encode(conv(), t, TOK, cutoff_len=full_len - 1)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert info == {"turns_dropped": 1, "cut": 0}
    # 2. The last turn alone is too long: cut at the right (the answer loses its tail).
    ids, mask, info = encode(conv(), t, TOK, cutoff_len=len(want_ids) - 2)
    np.testing.assert_array_equal(ids, want_ids[:-2])
    np.testing.assert_array_equal(mask, want_mask[:-2])
    assert info == {"turns_dropped": 1, "cut": 2}
    # 3. Nothing of the answer left: the sample is dropped.
    assert encode(conv(), t, TOK, cutoff_len=len(want_ids) - 3) is None


def test_render_text_and_template_definitions():
    text = render_text(conv(), TEMPLATES["chatml"])
    assert text == TOK.decode(layout(EXPECTED["chatml"])[0])
    for name, tmpl in TEMPLATES.items():
        assert tmpl.name == name and "{content}" in tmpl.user and "{content}" in tmpl.assistant
        assert all(m in "".join(tmpl.to_dict()[k] for k in ("user", "assistant", "observation",
                                                           "function_call", "think_prompt",
                                                           "think")) for m in tmpl.markers)
