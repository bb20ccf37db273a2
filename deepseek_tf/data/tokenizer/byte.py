"""The byte-level tokenizer: UTF-8 bytes are the ids; needs no files."""

from __future__ import annotations

import numpy as np

from deepseek_tf.data.tokenizer.base import Tokenizer


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

    def _encode(self, text):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self):
        return {"type": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}

    def tf_tokenizer(self):
        return TFByteTokenizer()


class TFByteTokenizer:
    """In-graph byte tokenizer: strings -> int32 RaggedTensor of byte ids, and back.

    Example:
        >>> TFByteTokenizer().tokenize(tf.constant(["hi"])).to_list()
        [[104, 105]]
    """

    def tokenize(self, strings):
        import tensorflow as tf

        chars = tf.strings.bytes_split(strings)                       # ragged of 1-byte strings
        flat = tf.io.decode_raw(chars.flat_values, tf.uint8)[:, 0]    # (N,)
        return chars.with_flat_values(tf.cast(flat, tf.int32))

    def detokenize(self, ids):
        import tensorflow as tf

        table = tf.constant([bytes([i]) for i in range(256)])
        ids = tf.ragged.boolean_mask(ids, (ids >= 0) & (ids < 256))
        return tf.strings.reduce_join(tf.gather(table, ids), axis=-1)
