"""Tokenizers: byte-level (default, no files), SentencePiece, Hugging Face tokenizer.json.

Every tokenizer exposes the same small interface (`encode`, `encode_batch`,
`decode`, `vocab_size`, special ids, `fingerprint`, `save`) so that prepare,
training and export do not care which one is used. `save(dir)` writes
`tokenizer_config.json` (the spec + fingerprint) and the model file, if any;
`load_tokenizer(dir)` reads it back and checks the fingerprint.

    byte           256 byte ids + BOS/EOS/PAD; round-trips any bytes
    sentencepiece  trained on the prepared corpus with `sentencepiece` (byte
                   fallback, so nothing is unknown); in-graph via tensorflow-text
    hf             a `tokenizer.json` (what DeepSeek checkpoints ship) via `tokenizers`

Example:
    >>> tok = make_tokenizer("byte")
    >>> ids = tok.encode("héllo")
    >>> tok.decode(ids)
    'héllo'
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from deepseek_tf.config import TokenizerConfig
from deepseek_tf.data.tokenizer.base import TOKENIZER_FILE, Tokenizer, sha256_bytes
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.errors import UserError

__all__ = ["TOKENIZER_FILE", "ByteTokenizer", "Tokenizer", "build_tokenizer",
           "copy_tokenizer", "load_tokenizer", "make_tokenizer", "sha256_bytes"]

_NO_FILES = {ByteTokenizer.name: ByteTokenizer}


def make_tokenizer(name: str) -> Tokenizer:
    """Builds a tokenizer that needs no trained files, by name."""
    if name not in _NO_FILES:
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(_NO_FILES)} "
                        f"(sentencepiece and hf need files: see build_tokenizer).")
    return _NO_FILES[name]()


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str] | None = None,
                    user_symbols: tuple[str, ...] = (), num_threads: int = 1,
                    log=print) -> Tokenizer:
    """The tokenizer of `cfg` for prepare: built, loaded from --tokenizer.path, or trained.

    Args:
      cfg: the tokenizer config.
      texts: a one-pass iterable of training text (sentencepiece without a path).
      user_symbols: strings that must stay single tokens (chat template markers).
      num_threads: SentencePiece training threads.
      log: progress printer.
    """
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "hf":
        from deepseek_tf.data.tokenizer.hf import HFTokenizer
        return HFTokenizer.from_path(cfg.path, cfg.bos_token, cfg.eos_token, cfg.pad_token)
    from deepseek_tf.data.tokenizer.spm import SentencePieceTokenizer
    if cfg.path:
        return SentencePieceTokenizer.from_file(cfg.path)
    if texts is None:
        raise UserError("training a SentencePiece tokenizer needs the corpus text.")
    return SentencePieceTokenizer.train(texts, cfg.vocab_size, cfg.model_type, user_symbols,
                                        cfg.sample_lines, num_threads, log=log)


def load_tokenizer(directory: str) -> Tokenizer:
    """Reads the tokenizer that `Tokenizer.save` wrote into `directory`."""
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer {path}: {e}; re-run prepare.") from e
    kind = spec.get("type", "?")
    if kind == "sentencepiece":
        from deepseek_tf.data.tokenizer.spm import SentencePieceTokenizer
        tok = SentencePieceTokenizer.from_file(
            os.path.join(directory, SentencePieceTokenizer.MODEL_FILE))
    elif kind == "hf":
        from deepseek_tf.data.tokenizer.hf import HFTokenizer
        tok = HFTokenizer.from_path(os.path.join(directory, HFTokenizer.MODEL_FILE),
                                    spec.get("bos_token") or "", spec["eos_token"],
                                    spec["pad_token"], none_bos=spec.get("bos_id", 0) < 0)
    else:
        tok = make_tokenizer(kind)
    if spec.get("fingerprint") not in (None, tok.fingerprint):
        raise UserError(f"{path}: tokenizer fingerprint {spec.get('fingerprint')} does not "
                        f"match its files ({tok.name} tokenizer {tok.fingerprint}); re-run "
                        f"prepare.")
    return tok


def copy_tokenizer(src_dir: str, dst_dir: str) -> Tokenizer:
    """Copies (and so verifies) the tokenizer saved in `src_dir` into `dst_dir`."""
    tok = load_tokenizer(src_dir)
    tok.save(dst_dir)
    return tok
