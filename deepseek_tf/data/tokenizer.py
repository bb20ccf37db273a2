"""Tokenizers. The default is a byte-level tokenizer that needs no files at all.

Every tokenizer exposes the same small interface (`encode`, `decode`, `vocab_size`,
special ids, `fingerprint`, `save`) so that prepare, training and export do not
care which one is used. `load_tokenizer(dir)` reads back what `save` wrote.

Example:
    >>> tok = ByteTokenizer()
    >>> ids = tok.encode("héllo")
    >>> tok.decode(ids)
    'héllo'
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from deepseek_tf.config import UserError

TOKENIZER_FILE = "tokenizer_config.json"


class Tokenizer:
    """Interface of every tokenizer (see `ByteTokenizer`)."""

    name = "base"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description that fully determines the tokenizer."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.spec(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**self.spec(), "fingerprint": self.fingerprint}, f, indent=2)
        os.replace(tmp, path)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258.

    Round-trips any text exactly, and any byte string via `decode_bytes`
    (invalid UTF-8 included). `decode` replaces invalid UTF-8 with U+FFFD.

    Example:
        >>> ByteTokenizer().encode("a", add_bos=False, add_eos=False).tolist()
        [97]
    """

    name = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text, add_bos=True, add_eos=True):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        parts = ([np.array([self.bos_id], np.int32)] if add_bos else []) + [ids] + (
            [np.array([self.eos_id], np.int32)] if add_eos else [])
        return np.concatenate(parts)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self):
        return {"type": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


_REGISTRY = {ByteTokenizer.name: ByteTokenizer}


def make_tokenizer(name: str) -> Tokenizer:
    """Builds a tokenizer that needs no trained files, by name."""
    if name not in _REGISTRY:
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]()


def load_tokenizer(directory: str) -> Tokenizer:
    """Reads the tokenizer that `Tokenizer.save` wrote into `directory`."""
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer {path}: {e}; re-run prepare.") from e
    tok = make_tokenizer(spec.get("type", "?"))
    if spec.get("fingerprint") not in (None, tok.fingerprint):
        raise UserError(f"{path}: tokenizer fingerprint {spec.get('fingerprint')} does not "
                        f"match this deepseek_tf's {tok.name} tokenizer; re-run prepare.")
    return tok
