"""Prompts and stop tokens from a run's tokenizer and chat template.

Example:
    >>> tok = ByteTokenizer()
    >>> prompt_ids("Hi", tok, TEMPLATES["plain"]).tolist()[:1]
    [256]
    >>> stop_ids(tok, TEMPLATES["plain"])
    (257,)
"""

from __future__ import annotations

import numpy as np

from deepseek_tf.data.sft import encode_prompt
from deepseek_tf.data.templates import Template


def prompt_ids(text: str, tok, template: Template | None = None, system: str = "") -> np.ndarray:
    """int32 ids of a prompt: plain text after BOS, or with `template` a one-turn
    chat (prefix, system, user turn, assistant header; a reasoning template adds its
    think prompt), ready for the model to write the answer."""
    if template is None:
        return tok.encode(text, add_bos=True, add_eos=False)
    return encode_prompt(text, template, tok, system)


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


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """`text` up to the first stop string; True if one was found."""
    cut = min((text.index(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def strip_special(ids, tok) -> list[int]:
    """Ids without BOS/EOS/PAD (for decoding generated text)."""
    special = {tok.bos_id, tok.eos_id, tok.pad_id}
    return [int(i) for i in ids if int(i) not in special]
