"""Prompts and stops from a run's tokenizer and chat template: the chat profile.

`chat_profile(exp, tok)` is the one place that decides a run's chat template and its
stops; the generate CLI, evaluate, the SavedModel and the `.litertlm` export all use it.

Example:
    >>> tok = ByteTokenizer()
    >>> prompt_ids("Hi", tok, TEMPLATES["plain"]).tolist()[:1]
    [256]
    >>> stop_ids(tok, TEMPLATES["plain"])
    (257,)
    >>> stop_sequences(tok, TEMPLATES["chatml"])[1][:3]
    (60, 124, 105)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_tf.data.sft import (Conversation, _segments, encode_pieces, encode_prompt)
from deepseek_tf.data.templates import TEMPLATES, Template
from deepseek_tf.errors import UserError

#: Chat message roles (OpenAI style) -> the template's turn kinds.
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
              "tool": "observation"}


@dataclasses.dataclass(frozen=True)
class ChatProfile:
    """How a run talks: its chat template (None: plain text after BOS) and its stops.

    Args:
      template: the chat `Template`, or None.
      stop_ids: single-token stops (EOS, a one-token end-of-turn marker).
      stop_strings: end-of-turn markers the tokenizer spells with several tokens
        (generated text is cut at the first one).
      stops: every stop as a token-id sequence (what the decode loop matches).

    Example:
        >>> chat_profile(exp, ByteTokenizer()).stops
        ((257,), (60, 124, 105, 109, 95, 101, 110, 100, 124, 62))
    """

    template: Template | None
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    stops: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tok, template: Template | None) -> "ChatProfile":
        return cls(template, stop_ids(tok, template), stop_strings(tok, template),
                   stop_sequences(tok, template))


def trained_on_chats(exp) -> bool:
    """True if the run trained on templated conversations (SFT data, DPO pairs, KTO
    answers or GRPO prompts)."""
    return bool(exp.data.is_sft or getattr(exp.train, "stage", "") in ("dpo", "kto", "grpo"))


def chat_profile(exp, tok, template: str = "", chat: bool | None = None) -> ChatProfile:
    """The run's chat profile.

    Args:
      exp: the run's `Experiment`.
      tok: its tokenizer.
      template: a template name that replaces the run's.
      chat: None = a template if one is named or the run trained on conversations;
        True = always (the run's `--data.template` unless named); False = plain text.
    """
    if chat is False:
        return ChatProfile.of(tok, None)
    name = template or (exp.data.template if chat or trained_on_chats(exp) else "")
    if not name:
        return ChatProfile.of(tok, None)
    if name not in TEMPLATES:
        raise UserError(f"--template={name!r} is not one of {', '.join(TEMPLATES)}.")
    return ChatProfile.of(tok, TEMPLATES[name])


def prompt_ids(text: str, tok, template: Template | None = None, system: str = "") -> np.ndarray:
    """int32 ids of a prompt: plain text after BOS, or with `template` a one-turn
    chat (prefix, system, user turn, assistant header; a reasoning template adds its
    think prompt), ready for the model to write the answer."""
    if template is None:
        return tok.encode(text, add_bos=True, add_eos=False)
    return encode_prompt(text, template, tok, system)


def chat_prompt_ids(messages, tok, template: Template) -> np.ndarray:
    """int32 ids of a conversation ready for the next answer, exactly as training
    renders it: `messages` are (role, content) with roles system (first only), then
    user/tool and assistant alternating, ending with user or tool."""
    messages = list(messages)
    system = messages.pop(0)[1] if messages and messages[0][0] == "system" else ""
    msgs = tuple((CHAT_ROLES[r], c) for r, c in messages) + (("assistant", ""),)
    head, sep, turns = _segments(Conversation(system, "", msgs), template)
    parts = [encode_pieces(head, tok)]
    for k, (p, a) in enumerate(turns):
        if k:
            parts.append(encode_pieces(sep, tok))
        parts.append(encode_pieces(p, tok))
        if k + 1 < len(turns):
            parts.append(encode_pieces(a, tok))
    return np.concatenate(parts).astype(np.int32)


def stop_ids(tok, template: Template | None = None) -> tuple[int, ...]:
    """Token ids that end generation: EOS, plus the template's end-of-turn marker
    when the tokenizer encodes it as one token (see `stop_strings` otherwise)."""
    ids = [tok.eos_id]
    if template is not None and template.stop != "{eos}":
        marker = tok.encode(template.stop, add_bos=False, add_eos=False)
        if len(marker) == 1:
            ids.append(int(marker[0]))
    return tuple(dict.fromkeys(int(i) for i in ids))


def stop_strings(tok, template: Template | None = None) -> tuple[str, ...]:
    """End-of-turn markers that span several tokens (the byte tokenizer spells
    `<|im_end|>` out): generated text is cut at the first one."""
    if template is None or template.stop == "{eos}":
        return ()
    return () if len(tok.encode(template.stop, add_bos=False, add_eos=False)) == 1 \
        else (template.stop,)


def stop_sequences(tok, template: Template | None = None) -> tuple[tuple[int, ...], ...]:
    """Every stop as token ids: the single-token stops, then each multi-token marker as
    the tokenizer encodes it (the decode loop ends a row when its newest tokens match)."""
    seqs = [(i,) for i in stop_ids(tok, template)]
    seqs += [tuple(int(i) for i in tok.encode(s, add_bos=False, add_eos=False))
             for s in stop_strings(tok, template)]
    return tuple(seqs)


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """`text` up to the first stop string; True if one was found."""
    cut = min((text.index(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stream_text(ids, tok, stops=()) -> tuple[str, bool]:
    """(text a stream may show now, stopped) of the tokens generated so far: the text cut
    at the first stop string (stopped = True), or else without what may still change (a
    trailing half UTF-8 character, the start of a stop string)."""
    text, stopped = cut_at_stop(tok.decode(strip_special(ids, tok)), stops)
    if stopped:
        return text, True
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False


def strip_special(ids, tok) -> list[int]:
    """Ids without BOS/EOS/PAD (for decoding generated text)."""
    special = {tok.bos_id, tok.eos_id, tok.pad_id}
    return [int(i) for i in ids if int(i) not in special]
