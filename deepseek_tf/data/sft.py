"""Instruction data: alpaca / sharegpt records -> conversations -> tokens + loss mask.

Formats (field names as in LLaMA-Factory's dataset docs):

    alpaca    instruction, input (appended to the instruction after a newline),
              output, optional system and history ([[query, answer], ...])
    sharegpt  conversations (or messages): [{from|role, value|content}], roles
              human/user, gpt/assistant, system (first only), function_call,
              observation/tool; optional top-level system and tools

A conversation must alternate prompt side (user / observation) and answer side
(assistant / function_call), starting with a prompt and ending with an answer.

Loss mask (per token, 1 = the token is a training target): answer segments are
1 and everything else 0; `train_on_prompt` sets prompt segments to 1 as well;
`mask_history` sets every answer but the last to 0.

Truncation policy (`cutoff_len` tokens): whole turns are dropped from the
start of the history (the system text and the last turn are kept) until the
sample fits; if the last turn alone does not fit, the sample is cut at the
right (the answer loses its tail). A sample left without any target token is
dropped (counted as `no_target` in the report).

Example:
    >>> conv = parse_record({"instruction": "Add", "input": "1+1", "output": "2"}, "alpaca")
    >>> ids, mask, info = encode(conv, TEMPLATES["plain"], ByteTokenizer(), cutoff_len=64)
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from deepseek_tf.data.templates import Special, Template, pieces, split_reasoning

PROMPT_ROLES = ("user", "observation")
ANSWER_ROLES = ("assistant", "function_call")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "model": "assistant", "bot": "assistant", "system": "system",
                 "function_call": "function_call", "tool_call": "function_call",
                 "observation": "observation", "tool": "observation", "function": "observation"}


class BadSample(ValueError):
    """A record that is not a valid sample of its format (missing field, bad turns)."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A normalized sample: system text, tool definitions, (role, content) messages."""

    system: str
    tools: str
    messages: tuple[tuple[str, str], ...]

    def to_json(self) -> dict:
        return {"system": self.system, "tools": self.tools, "messages": list(self.messages)}

    @classmethod
    def from_json(cls, d: dict) -> "Conversation":
        return cls(d["system"], d["tools"], tuple((r, c) for r, c in d["messages"]))

    def texts(self) -> list[str]:
        return [self.system, self.tools] + [c for _, c in self.messages]

    def map_texts(self, fn) -> "Conversation":
        return Conversation(fn(self.system), fn(self.tools),
                            tuple((r, fn(c)) for r, c in self.messages))


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadSample(f"{what} is {type(value).__name__}, not text")
    return value


def _required(record: dict, key: str) -> str:
    text = _text(record.get(key), f"field {key!r}")
    if not text:
        raise BadSample(f"missing field {key!r}")
    return text


def parse_alpaca(record: dict) -> Conversation:
    instruction, output = _required(record, "instruction"), _required(record, "output")
    query = _text(record.get("input"), "field 'input'")
    messages = []
    history = record.get("history") or []
    if not isinstance(history, (list, tuple)):
        raise BadSample("field 'history' must be a list of [query, answer] pairs")
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadSample("field 'history' must be a list of [query, answer] pairs")
        messages += [("user", _text(pair[0], "history query")),
                     ("assistant", _text(pair[1], "history answer"))]
    messages += [("user", instruction + ("\n" + query if query else "")), ("assistant", output)]
    return Conversation(_text(record.get("system"), "field 'system'"), "", tuple(messages))


def parse_sharegpt(record: dict) -> Conversation:
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
        raise BadSample("missing field 'conversations' (or 'messages')")
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadSample("field 'conversations' must be a non-empty list")
    system = _text(record.get("system"), "field 'system'")
    tools = record.get("tools") or ""
    if not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    messages = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise BadSample(f"message {i} is not an object")
        raw_role = m.get("from", m.get("role"))
        role = _ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise BadSample(f"message {i} has unknown role {raw_role!r}")
        content = _text(m.get("value", m.get("content")), f"message {i} content")
        if role == "system":
            if i != 0:
                raise BadSample(f"message {i}: a system message must come first")
            system = content
            continue
        messages.append((role, content))
    return Conversation(system, tools, tuple(messages))


def check_turns(conv: Conversation) -> None:
    """Raises BadSample unless messages alternate prompt / answer, ending with an answer."""
    if not conv.messages:
        raise BadSample("no messages")
    for i, (role, _) in enumerate(conv.messages):
        expected = PROMPT_ROLES if i % 2 == 0 else ANSWER_ROLES
        if role not in expected:
            raise BadSample(f"message {i} is {role!r} but a {'/'.join(expected)} message "
                            f"must come there (turns must alternate)")
    if len(conv.messages) % 2:
        raise BadSample("the conversation must end with an assistant answer")


def parse_record(record: dict, fmt: str) -> Conversation:
    conv = parse_alpaca(record) if fmt == "alpaca" else parse_sharegpt(record)
    check_turns(conv)
    return conv


def _segments(conv: Conversation, t: Template):
    """(head pieces, separator pieces, [(prompt pieces, answer pieces)] per turn)."""
    system = conv.system or t.default_system
    tools = pieces(t.tools, content=conv.tools) if conv.tools else []
    tools_text = "".join(p for p in tools if isinstance(p, str))
    system_text = "\n\n".join(s for s in (system, tools_text) if s)
    head = pieces(t.prefix) + (pieces(t.system, content=system_text) if system_text else [])
    turns = []
    msgs = conv.messages
    for i in range(0, len(msgs), 2):
        (p_role, p_text), (a_role, a_text) = msgs[i], msgs[i + 1]
        last = i + 2 == len(msgs)
        prompt = pieces(t.user if p_role == "user" else t.observation, content=p_text)
        reasoning = ""
        if t.think and a_role == "assistant":
            reasoning, a_text = split_reasoning(a_text)
        answer = pieces(t.assistant if a_role == "assistant" else t.function_call,
                        content=a_text)
        if t.think and last and a_role == "assistant":
            prompt += pieces(t.think_prompt)
            answer = pieces(t.think, reasoning=reasoning) + answer
        turns.append((prompt, answer))
    return head, pieces(t.separator), turns


def encode_pieces(items: list, tok) -> np.ndarray:
    """Text runs are encoded together; Special markers become the tokenizer's ids."""
    out, text = [], []

    def flush():
        if text:
            out.append(tok.encode("".join(text), add_bos=False, add_eos=False))
            text.clear()

    for item in items:
        if isinstance(item, Special):
            flush()
            i = tok.bos_id if item.kind == "bos" else tok.eos_id
            if i >= 0:
                out.append(np.array([i], np.int32))
        else:
            text.append(item)
    flush()
    return np.concatenate(out).astype(np.int32) if out else np.zeros([0], np.int32)


def encode(conv: Conversation, template: Template, tok, cutoff_len: int,
           train_on_prompt: bool = False, mask_history: bool = False):
    """Renders and tokenizes a conversation under the truncation policy.

    Returns (ids int32, loss mask uint8, info) where info has `turns_dropped`
    and `cut` (tokens cut at the right), or None when no target token is left.
    """
    head, sep, turns = _segments(conv, template)
    head_ids, sep_ids = encode_pieces(head, tok), encode_pieces(sep, tok)
    enc = [(encode_pieces(p, tok), encode_pieces(a, tok)) for p, a in turns]
    n_turns = len(enc)

    def total(first: int) -> int:
        body = sum(len(p) + len(a) for p, a in enc[first:])
        return len(head_ids) + body + len(sep_ids) * (n_turns - first - 1)

    first = 0
    while first < n_turns - 1 and total(first) > cutoff_len:
        first += 1
    ids, mask = [head_ids], [np.full(len(head_ids), int(train_on_prompt), np.uint8)]
    for k in range(first, n_turns):
        p, a = enc[k]
        if k > first:
            ids.append(sep_ids)
            mask.append(np.full(len(sep_ids), int(train_on_prompt), np.uint8))
        trained = not mask_history or k == n_turns - 1
        ids += [p, a]
        mask += [np.full(len(p), int(train_on_prompt), np.uint8),
                 np.full(len(a), int(trained), np.uint8)]
    ids, mask = np.concatenate(ids).astype(np.int32), np.concatenate(mask)
    cut = max(len(ids) - cutoff_len, 0)
    if cut:
        ids, mask = ids[:cutoff_len], mask[:cutoff_len]
    if not mask[1:].any():  # the first token is never a target
        return None
    return ids, mask, {"turns_dropped": first, "cut": cut}


def render_text(conv: Conversation, template: Template) -> str:
    """The conversation as text (special ids left out): for training a tokenizer."""
    head, sep, turns = _segments(conv, template)
    items = list(head)
    for k, (p, a) in enumerate(turns):
        items += (sep if k else []) + p + a
    return "".join(i for i in items if isinstance(i, str))


def encode_prompt(text: str, template: Template, tok, system: str = "") -> np.ndarray:
    """int32 ids of a one-turn chat ready for the answer: prefix, system text, the
    user turn with the assistant header (and a reasoning template's think prompt)."""
    head, _, turns = _segments(Conversation(system, "", (("user", text), ("assistant", ""))),
                               template)
    return encode_pieces(head + turns[0][0], tok)
