"""Generation: the KV-cached decode loop, samplers, and `python -m deepseek_tf.generate`.

    sampling.py  greedy / temperature / top-k / top-p with per-row seeds
    decode.py    `generate_ids` (prefill + `tf.while_loop` decode), `score_ids`,
                 and `Generator`, which compiles them for a fixed cache length
    text.py      the chat profile: prompts (plain or chat template) and stops

The names below load on first use, so `python -m deepseek_tf.generate` can quiet
TensorFlow's log before TensorFlow is imported.
"""

_EXPORTS = {"Generator": "decode", "generate_ids": "decode", "score_ids": "decode",
            "sample_tokens": "sampling"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
