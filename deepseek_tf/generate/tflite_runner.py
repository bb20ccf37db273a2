"""Generation with an exported `.tflite` file through `ai_edge_litert`'s interpreter.

Drives the file the way LiteRT-LM does (see `export/tflite.py` for the contract):
the prompt minus its last token goes through the `prefill_<N>` signatures in
chunks (a short chunk is padded with token 0 at input_pos 0), the last prompt
token and every generated token through `decode`, and each step's caches are fed
to the next. Tokens are drawn by the same `sample_tokens` as the TensorFlow
decode loop (run eagerly on the logits, step i for the i-th new token), so a seed
gives the same choices given the same logits.

Example:
    >>> runner = TFLiteRunner("out/tiny.tflite")
    >>> ids = runner.generate([256, 72, 105], max_new_tokens=16, stop_ids=(257,))
"""

from __future__ import annotations

import numpy as np

from deepseek_tf.errors import UserError


class TFLiteRunner:
    """One interpreter with its `decode` / `prefill_<N>` runners and a KV cache.

    Args:
      path: the `.tflite` file (from `export --format=tflite`).
      num_threads: interpreter threads (None: the runtime's default).
    """

    def __init__(self, path: str, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"cannot load {path} as a TFLite model: {e}") from e
        sigs = self.interpreter.get_signature_list()
        prefills = sorted(int(n.split("_", 1)[1]) for n in sigs
                          if n.startswith("prefill_") and n.split("_", 1)[1].isdigit())
        if "decode" not in sigs or not prefills:
            raise UserError(f"{path} has signatures {sorted(sigs)}; a KV-cached decoder "
                            f"needs `decode` and `prefill_<N>` (export --format=tflite).")
        self.decode_runner = self.interpreter.get_signature_runner("decode")
        self.prefill_runners = {n: self.interpreter.get_signature_runner(f"prefill_{n}")
                                for n in prefills}
        details = self.decode_runner.get_input_details()
        self.cache_shapes = {k: tuple(d["shape"]) for k, d in details.items()
                             if k.startswith("kv_cache_")}
        self.context = int(self.cache_shapes["kv_cache_k_0"][2])
        self.vocab_size = int(self.decode_runner.get_output_details()["logits"]["shape"][-1])
        self.reset()

    def reset(self) -> None:
        """Starts a new sequence (a zero cache at position 0)."""
        self.cache = {k: np.zeros(s, np.float32) for k, s in self.cache_shapes.items()}
        self.pos = 0

    def prefill(self, ids) -> None:
        """Writes `ids` into the cache at the current position (no logits)."""
        ids = [int(i) for i in ids]
        while ids:
            fit = [n for n in self.prefill_runners if n <= len(ids)]
            n = max(fit) if fit else min(self.prefill_runners)
            chunk, ids = ids[:n], ids[n:]
            tokens = np.zeros((1, n), np.int32)
            pos = np.zeros((n,), np.int32)
            tokens[0, :len(chunk)] = chunk
            pos[:len(chunk)] = np.arange(self.pos, self.pos + len(chunk))
            out = self.prefill_runners[n](tokens=tokens, input_pos=pos, **self.cache)
            self.cache = {k: out[k] for k in self.cache}
            self.pos += len(chunk)

    def decode(self, token: int) -> np.ndarray:
        """float32 (vocab,) next-token logits after `token` at the current position."""
        out = self.decode_runner(tokens=np.array([[token]], np.int32),
                                 input_pos=np.array([self.pos], np.int32), **self.cache)
        self.cache = {k: out[k] for k in self.cache}
        self.pos += 1
        return out["logits"][0, -1]

    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = -1, stop_ids=(),
                 streamer=None) -> list[int]:
        """New token ids after `prompt` (a stop is included and ends it). `stop_ids` holds
        token ids or id sequences (multi-token stops); `max_new_tokens` defaults to
        decode.MAX_NEW_TOKENS; a negative seed draws a fresh one. `streamer(step, token)`
        is called after each token."""
        import tensorflow as tf

        from deepseek_tf.generate.decode import MAX_NEW_TOKENS, normalize_stops
        from deepseek_tf.generate.sampling import resolve_seeds, sample_tokens

        max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        stops = normalize_stops(stop_ids)
        prompt = [int(i) for i in prompt]
        if not prompt:
            raise UserError("the prompt is empty; give at least one token.")
        if len(prompt) + max_new_tokens > self.context:
            raise UserError(f"{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} "
                            f"exceed the file's context of {self.context} tokens; shorten "
                            f"the prompt, lower --max_new_tokens or re-export with a larger "
                            f"--max_length.")
        self.reset()
        self.prefill(prompt[:-1])
        logits = self.decode(prompt[-1])
        rows = (tf.constant([temperature], tf.float32), tf.constant([top_k], tf.int32),
                tf.constant([top_p], tf.float32), resolve_seeds([seed]))
        out = []
        for step in range(max_new_tokens):
            if temperature <= 0:
                token = int(np.argmax(logits))
            else:
                token = int(sample_tokens(tf.constant(logits[None]), *rows, step)[0])
            out.append(token)
            if streamer is not None:
                streamer(step, token)
            if any(tuple(out[-len(s):]) == s for s in stops) or step + 1 == max_new_tokens:
                break
            logits = self.decode(token)
        return out
