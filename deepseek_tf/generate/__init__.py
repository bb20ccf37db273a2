"""Generation: the KV-cached decode loop, samplers, and `python -m deepseek_tf.generate`.

    sampling.py  greedy / temperature / top-k / top-p with per-row seeds
    decode.py    `generate_ids` (prefill + `tf.while_loop` decode), `score_ids`,
                 and `Generator`, which compiles them for a fixed cache length
    text.py      prompts (plain or chat template) and stop tokens
"""

from deepseek_tf.generate.decode import Generator, generate_ids, score_ids
from deepseek_tf.generate.sampling import sample_tokens

__all__ = ["Generator", "generate_ids", "sample_tokens", "score_ids"]
