"""SentencePiece: trained on the prepared corpus, applied in Python or in-graph.

Training settings are chosen so that tokenization is lossless: identity
normalization (prepare already normalized), no dummy prefix, no whitespace
squashing, byte fallback (no unknown tokens), newline as a single piece, and
the chat template's markers as unsplittable user symbols. Ids: UNK=0, BOS=1,
EOS=2, PAD=3.
"""

from __future__ import annotations

import io
from typing import Iterable, Iterator

import numpy as np

from deepseek_tf.data.tokenizer.base import Tokenizer, sha256_bytes
from deepseek_tf.errors import UserError


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (the serialized proto is all its state).

    Args:
      model_proto: the bytes of a `.model` file.

    Example:
        >>> tok = SentencePieceTokenizer.train(["a b c"] * 100, vocab_size=300)
        >>> tok.decode(tok.encode("a b")) == "a b"
        True
    """

    name = "sentencepiece"
    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except (RuntimeError, OSError) as e:
            raise UserError(f"not a SentencePiece model: {e}") from e
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise UserError("the SentencePiece model has no EOS piece (eos_id=-1); train it "
                            "with an eos_id, or let prepare train one.")
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else self.eos_id

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise UserError(f"cannot read SentencePiece model {path}: {e}") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              user_symbols: tuple[str, ...] = (), sample_lines: int = 1_000_000,
              num_threads: int = 1, log=print) -> "SentencePieceTokenizer":
        """Trains on the non-empty lines of `texts` (sampled down to `sample_lines`).

        Deterministic: the same texts and settings give the same model bytes.
        """
        import sentencepiece as spm

        symbols = ["\n"] + [s for s in dict.fromkeys(user_symbols) if s and s != "\n"]
        out = io.BytesIO()
        log(f"training a {model_type} SentencePiece tokenizer ({vocab_size} pieces)")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts), model_writer=out, vocab_size=vocab_size,
                model_type=model_type, byte_fallback=True, character_coverage=0.9999,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=symbols,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
                max_sentence_length=1 << 14, input_sentence_size=sample_lines,
                shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2)
        except RuntimeError as e:
            raise UserError(f"SentencePiece training failed: {str(e).strip()} (adjust "
                            f"--tokenizer.vocab_size to the corpus).") from e
        return cls(out.getvalue())

    def _encode(self, text):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return np.asarray(self.sp.encode(text), np.int32)

    def encode_batch(self, texts, add_bos=True, add_eos=True):
        texts = [bytes(t).decode("utf-8") if isinstance(t, (bytes, bytearray)) else t
                 for t in texts]
        return [self._frame(ids, add_bos, add_eos) for ids in self.sp.encode(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if i not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.sp.decode(ids)

    def spec(self):
        return {"type": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id,
                "model_sha256": sha256_bytes(self.model_proto)}

    def files(self):
        return {self.MODEL_FILE: self.model_proto}

    def tf_tokenizer(self):
        """tensorflow_text.SentencepieceTokenizer over the same model (int32 ids)."""
        import tensorflow as tf
        import tensorflow_text as tf_text

        return tf_text.SentencepieceTokenizer(model=self.model_proto, out_type=tf.int32)
