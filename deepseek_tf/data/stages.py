"""Per-chunk work of prepare, run in this process or in `--data.num_proc` workers.

This module must not import TensorFlow: spawned workers import it.

    clean_chunk   Record / BadInput -> ("bad", ...) | ("drop", ...) | ("keep", ...)
                  (parse, clean, filter, content hash, MinHash signature)
    encode_chunk  staged documents -> token ids (+ loss mask for SFT)

Example:
    >>> init_clean(DataConfig())
    >>> clean_chunk([Record("a.txt", "a.txt", "hello")])[0][0]
    'keep'
"""

from __future__ import annotations

import json

from deepseek_tf.config import DataConfig
from deepseek_tf.data import ingest, sft
from deepseek_tf.data.clean import Cleaner
from deepseek_tf.data.dedup import MinHasher, exact_key
from deepseek_tf.data.templates import TEMPLATES

_STATE: dict = {}


def init_clean(cfg: DataConfig) -> None:
    _STATE["cfg"] = cfg
    _STATE["cleaner"] = Cleaner.from_config(cfg)
    _STATE["hasher"] = (MinHasher(cfg.dedup_num_perm, cfg.dedup_ngram)
                        if cfg.dedup_threshold > 0 else None)


def _parse(record: ingest.Record, cfg: DataConfig, cleaner: Cleaner):
    """-> (staged payload, text for filters and near dedup, key text, changed steps)."""
    if cfg.is_sft:
        if not isinstance(record.value, dict):
            raise sft.BadSample("a plain text file is not an SFT record")
        conv = sft.parse_record(record.value, cfg.format)
        changed = set()

        def clean(text):
            text, steps = cleaner.clean(text)
            changed.update(steps)
            return text

        conv = conv.map_texts(clean)
        payload = {"n": record.name, "c": conv.to_json()}
        text = "\n".join(t for t in conv.texts() if t)
        return payload, text, json.dumps(conv.to_json(), ensure_ascii=False), sorted(changed)
    text, changed = cleaner.clean(ingest.text_of(record, cfg.text_field))
    return {"n": record.name, "t": text}, text, text, changed


def clean_chunk(items: list) -> list[tuple]:
    cfg, cleaner, hasher = _STATE["cfg"], _STATE["cleaner"], _STATE["hasher"]
    out = []
    for item in items:
        if isinstance(item, ingest.BadInput):
            out.append(("bad", item.where, item.kind, item.reason))
            continue
        try:
            payload, text, key_text, changed = _parse(item, cfg, cleaner)
        except (KeyError, TypeError, sft.BadSample) as e:
            reason = e.args[0] if e.args else str(e)
            kind = "missing_field" if str(reason).startswith("missing field") else "bad_sample"
            out.append(("bad", item.where, kind, str(reason)))
            continue
        rejected = cleaner.reject(text)
        if rejected:
            out.append(("drop", rejected, changed))
            continue
        key = exact_key(key_text) if cfg.dedup_exact else None
        sig = hasher.signature(text) if hasher is not None else None
        out.append(("keep", payload, key, sig, changed))
    return out


def init_encode(tokenizer_dir: str, cfg: DataConfig) -> None:
    from deepseek_tf.data.tokenizer import load_tokenizer

    _STATE["tok"] = load_tokenizer(tokenizer_dir)
    _STATE["cfg"] = cfg
    _STATE["template"] = TEMPLATES[cfg.template]


def encode_chunk(docs: list[dict]) -> list:
    """Per staged doc: (ids, None, None) for text, (ids, mask, info) or None for SFT."""
    tok, cfg = _STATE["tok"], _STATE["cfg"]
    if not cfg.is_sft:
        return [(ids, None, None) for ids in tok.encode_batch([d["t"] for d in docs])]
    return [sft.encode(sft.Conversation.from_json(d["c"]), _STATE["template"], tok,
                       cfg.resolved_cutoff_len, cfg.train_on_prompt, cfg.mask_history)
            for d in docs]


def encode_split_chunk(chunk: list[tuple[str, dict]]) -> list[tuple]:
    """[(split, doc)] -> [(split, encode_chunk result)]."""
    return list(zip([s for s, _ in chunk], encode_chunk([d for _, d in chunk])))


def training_text(doc: dict, cfg: DataConfig) -> str:
    """The text a tokenizer is trained on: the document, or the rendered conversation."""
    if "t" in doc:
        return doc["t"]
    return sft.render_text(sft.Conversation.from_json(doc["c"]), TEMPLATES[cfg.template])
