"""Chat templates as small declarative definitions.

A template is a handful of format strings. `{content}` is the message text (it
is never parsed for markers), `{bos}` / `{eos}` are the tokenizer's BOS / EOS
ids (whatever the tokenizer), everything else is literal text that the
tokenizer encodes (an HF tokenizer maps its added special tokens such as
`<｜User｜>` to their ids; the byte tokenizer spells them out).

A conversation renders as

    prefix + system(system text [+ tools]) +
    user(q1) answer(a1) separator user(q2) answer(a2) ...

where the user-side formats (`user`, `observation`) end with the assistant
header, so an answer segment holds exactly what the model must generate.
Reasoning templates (`think` set) render the last answer as
`think_prompt` (in the prompt) + `think` + answer and drop the reasoning of
earlier answers, as DeepSeek-R1's own chat template does.

Example:
    >>> TEMPLATES["chatml"].user
    '<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import dataclasses
import re

_FIELD = re.compile(r"(\{(?:bos|eos|content|reasoning)\})")


@dataclasses.dataclass(frozen=True)
class Template:
    """One chat format.

    Args:
      name: the `--data.template` value.
      prefix: rendered once at the start (typically "{bos}").
      system: formats the system text (skipped when there is none).
      user: a user turn, ending with the assistant header.
      assistant: an assistant answer (trained), ending with the stop marker.
      function_call: an assistant tool call (trained).
      observation: a tool result (prompt side), ending with the assistant header.
      tools: formats the tool definitions, appended to the system text.
      separator: between an answer and the next prompt (not trained).
      default_system: the system text when a sample has none.
      think_prompt: appended to the last prompt of reasoning templates.
      think: formats `{reasoning}` before the last answer (reasoning templates).
      stop: the text (or "{eos}") that ends an assistant turn, for generation.
      markers: special strings kept as single tokens by a trained SentencePiece.
    """

    name: str
    prefix: str = ""
    system: str = "{content}"
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    function_call: str = "{content}{eos}"
    observation: str = "{content}"
    tools: str = "{content}"
    separator: str = ""
    default_system: str = ""
    think_prompt: str = ""
    think: str = ""
    stop: str = "{eos}"
    markers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pieces(fmt: str, **values: str) -> list:
    """Splits a format into text and special markers: 'a{eos}' -> ['a', 'eos'] as
    [str, _Special]; `values` fill {content} / {reasoning}."""
    out = []
    for part in _FIELD.split(fmt):
        if not part:
            continue
        if part in ("{bos}", "{eos}"):
            out.append(Special(part[1:-1]))
        elif part in ("{content}", "{reasoning}"):
            out.append(values.get(part[1:-1], ""))
        else:
            out.append(part)
    return out


@dataclasses.dataclass(frozen=True)
class Special:
    """A tokenizer special id by role: "bos" or "eos"."""

    kind: str


_DS_MARKERS = ("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>",
               "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>",
               "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>")

_DEEPSEEK3 = Template(
    name="deepseek3",
    prefix="{bos}",
    system="{content}",
    user="<｜User｜>{content}<｜Assistant｜>",
    assistant="{content}{eos}",
    function_call="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{content}<｜tool▁call▁end｜>"
                  "<｜tool▁calls▁end｜>{eos}",
    observation="<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>"
                "<｜tool▁outputs▁end｜>",
    tools="## Tools\nYou have access to the following tools:\n{content}",
    markers=_DS_MARKERS,
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    _DEEPSEEK3,
    dataclasses.replace(_DEEPSEEK3, name="deepseek-r1", think_prompt="<think>\n",
                        think="{reasoning}\n</think>\n\n",
                        markers=_DS_MARKERS + ("<think>", "</think>")),
    Template(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        function_call="<tool_call>\n{content}\n</tool_call><|im_end|>",
        observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n",
        tools="# Tools\n\nYou may call one or more functions to assist with the user query."
              "\n\n<tools>\n{content}\n</tools>",
        separator="\n",
        stop="<|im_end|>",
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    Template(
        name="plain",
        prefix="{bos}",
        system="{content}\n\n",
        user="User: {content}\n\nAssistant: ",
        assistant="{content}{eos}",
        function_call="Tool call: {content}{eos}",
        observation="Tool result: {content}\n\nAssistant: ",
        tools="Tools:\n{content}",
        separator="\n\n",
    ),
)}


def split_reasoning(content: str) -> tuple[str, str]:
    """'<think>r</think>\\n\\nanswer' -> ('r', 'answer'); otherwise ('', content)."""
    stripped = content.lstrip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        head, _, answer = stripped[len("<think>"):].partition("</think>")
        return head.strip("\n"), answer.lstrip("\n")
    return "", content
