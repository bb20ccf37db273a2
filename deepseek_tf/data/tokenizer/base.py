"""The interface every tokenizer implements (`Tokenizer`), and how it is saved.

`save(dir)` writes `tokenizer_config.json` (the spec + fingerprint) and the model
file, if any; `load_tokenizer(dir)` (in the package) reads it back.

Example:
    >>> class Upper(Tokenizer): ...   # see ByteTokenizer for a complete one
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from deepseek_tf.atomic import atomic_write
from deepseek_tf.errors import UserError

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
            atomic_write(os.path.join(directory, name), content)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
