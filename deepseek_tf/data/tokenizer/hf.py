"""A Hugging Face `tokenizer.json` (what DeepSeek checkpoints ship), via `tokenizers`.

The special tokens come from `--tokenizer.bos_token/eos_token/pad_token`, else
from the `tokenizer_config.json` next to `tokenizer.json` (as HF checkpoints
have it); PAD falls back to EOS. Text is encoded without the tokenizer's own
post-processor (`add_special_tokens=False`): BOS / EOS are added by us, once.
"""

from __future__ import annotations

import json
import os

import numpy as np

from deepseek_tf.data.tokenizer.base import Tokenizer, sha256_bytes
from deepseek_tf.errors import UserError


def _token_text(value) -> str:
    """tokenizer_config.json stores a token as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with named special tokens.

    Args:
      tokenizer_json: the bytes of a tokenizer.json.
      bos_token: BOS token text ("" = no BOS).
      eos_token: EOS token text (required).
      pad_token: PAD token text ("" = EOS).
      where: the file name, for error messages.

    Example:
        >>> tok = HFTokenizer.from_path("DeepSeek-V3/")   # tokenizer.json + tokenizer_config.json
        >>> tok.decode(tok.encode("hello", add_bos=False, add_eos=False))
        'hello'
    """

    name = "hf"
    MODEL_FILE = "tokenizer.json"

    def __init__(self, tokenizer_json: bytes, bos_token: str, eos_token: str,
                 pad_token: str = "", where: str = "tokenizer.json"):
        import tokenizers

        self.tokenizer_json = bytes(tokenizer_json)
        try:
            self.tk = tokenizers.Tokenizer.from_str(self.tokenizer_json.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise UserError(f"{where} is not a valid tokenizer.json: {e}") from e
        if not eos_token:
            raise UserError(f"{where}: no EOS token known; set --tokenizer.eos_token=TOKEN "
                            f"(or ship a tokenizer_config.json with eos_token).")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.bos_id = self._id(bos_token, "bos", where) if bos_token else -1
        self.eos_id = self._id(eos_token, "eos", where)
        self.pad_id = self._id(self.pad_token, "pad", where)
        top = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size = max(int(self.tk.get_vocab_size(with_added_tokens=True)), top + 1)

    def _id(self, token: str, kind: str, where: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise UserError(f"{where}: the {kind} token {token!r} is not in the vocabulary; "
                            f"set --tokenizer.{kind}_token to one that is.")
        return int(i)

    @classmethod
    def from_path(cls, path: str, bos_token: str = "", eos_token: str = "",
                  pad_token: str = "", none_bos: bool = False) -> "HFTokenizer":
        """Loads `path` (tokenizer.json or its directory); empty tokens come from the
        sibling tokenizer_config.json. `none_bos` keeps "no BOS" even if that file has one."""
        file = os.path.join(path, cls.MODEL_FILE) if os.path.isdir(path) else path
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"cannot read HF tokenizer {file}: {e}; point --tokenizer.path "
                            f"at a tokenizer.json or the directory holding it.") from e
        hf_config = {}
        config_path = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.exists(config_path):
            try:
                with open(config_path) as f:
                    hf_config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read {config_path}: {e}") from e
        if not bos_token and not none_bos:
            bos_token = _token_text(hf_config.get("bos_token"))
        eos_token = eos_token or _token_text(hf_config.get("eos_token"))
        pad_token = pad_token or _token_text(hf_config.get("pad_token"))
        return cls(data, bos_token, eos_token, pad_token, where=file)

    def _encode(self, text):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts, add_bos=True, add_eos=True):
        texts = [bytes(t).decode("utf-8") if isinstance(t, (bytes, bytearray)) else t
                 for t in texts]
        encs = self.tk.encode_batch(texts, add_special_tokens=False)
        return [self._frame(e.ids, add_bos, add_eos) for e in encs]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if i not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.tk.decode(ids, skip_special_tokens=False)

    def spec(self):
        return {"type": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token,
                "tokenizer_sha256": sha256_bytes(self.tokenizer_json)}

    def files(self):
        return {self.MODEL_FILE: self.tokenizer_json}

    def extra_config(self):
        # Lets transformers.AutoTokenizer.from_pretrained(dir) load the saved directory.
        return {"tokenizer_class": "PreTrainedTokenizerFast"}
