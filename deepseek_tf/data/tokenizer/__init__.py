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

import hashlib
import json
import os
from typing import Iterable

import numpy as np

from deepseek_tf.config import TokenizerConfig, UserError

TOKENIZER_FILE = "tokenizer_config.json"


class Tokenizer:
    """Interface of every tokenizer (see `ByteTokenizer`).

    `bos_id` is -1 when the tokenizer has no BOS token (documents then start
    without one); `eos_id` and `pad_id` always exist.
    """

    name = "base"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """int32 ids of `text`, optionally framed by BOS / EOS."""
        return self._frame(self._encode(text), add_bos, add_eos)

    def encode_batch(self, texts: list, add_bos: bool = True,
                     add_eos: bool = True) -> list[np.ndarray]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def _encode(self, text) -> np.ndarray:
        raise NotImplementedError

    def _frame(self, ids, add_bos: bool, add_eos: bool) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        pre = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        post = [self.eos_id] if add_eos else []
        if not pre and not post:
            return ids
        return np.concatenate([np.asarray(pre, np.int32), ids, np.asarray(post, np.int32)])

    def decode(self, ids) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description that fully determines the tokenizer."""
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """Model files saved next to tokenizer_config.json (name -> content)."""
        return {}

    def extra_config(self) -> dict:
        """Keys saved in tokenizer_config.json besides the spec (not fingerprinted)."""
        return {}

    def tf_tokenizer(self):
        """An in-graph tokenizer with `tokenize(strings) -> RaggedTensor` and `detokenize`."""
        raise UserError(f"the {self.name} tokenizer cannot run inside a TensorFlow graph; "
                        f"tokenize outside the graph or use --tokenizer.type=sentencepiece.")

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.spec(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, directory: str) -> None:
        """Writes the model files, then tokenizer_config.json (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        config = {**self.spec(), "fingerprint": self.fingerprint, **self.extra_config()}
        items = list(self.files().items())
        items.append((TOKENIZER_FILE, (json.dumps(config, indent=2) + "\n").encode()))
        for name, content in items:
            path = os.path.join(directory, name)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(content)
            os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


from deepseek_tf.data.tokenizer.byte import ByteTokenizer  # noqa: E402

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
