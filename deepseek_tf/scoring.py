"""Next-token log-probabilities: the one scorer behind generate's `score` signature,
DPO's sequence log-probabilities, `evaluate`'s perplexity and classification, and
prepare's perplexity filter (`perplexity_scorer`).

Convention: entry t of every (B, T) output is about token t given tokens[:t]; entry 0
is always 0 (nothing predicts the first token). A `mask` (B, T) selects which tokens
count (1 = scored); entries outside it are 0. Log-probabilities are float32 whatever
the model's compute dtype.

Example:
    >>> logp, hits = score_tokens(model, ids, mask)   # each (B, T) float32
    >>> nll = -tf.reduce_sum(logp)
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.model import token_losses


def next_token_scores(logits: tf.Tensor, ids: tf.Tensor, mask: tf.Tensor | None = None,
                      temperature: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """(log p(ids[t] | ids[:t]), 1 if the argmax was ids[t]) per token, each (B, T)
    float32, from the model's `logits` (B, T, V) of `ids` (B, T).

    Args:
      temperature: the log-probabilities are those of softmax(logits / temperature), the
        distribution a sampler at that temperature draws from (GRPO scores its samples
        so); the argmax hits do not depend on it.
    """
    logits = logits[:, :-1]                                                # (B, T-1, V)
    targets = ids[:, 1:]                                                   # (B, T-1)
    scaled = logits if temperature == 1.0 else tf.cast(logits, tf.float32) / temperature
    logp = -token_losses(scaled, targets)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), targets),
                   tf.float32)
    logp, hits = (tf.pad(x, [[0, 0], [1, 0]]) for x in (logp, hits))     # (B, T)
    if mask is not None:
        mask = tf.cast(mask, tf.float32)
        logp, hits = logp * mask, hits * mask
    return logp, hits


def score_tokens(model, ids: tf.Tensor, mask: tf.Tensor | None = None,
                 training: bool = False,
                 moe_capacity_factor: float | None = None,
                 temperature: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """`next_token_scores` of one forward pass of `model` over `ids` (B, T).

    Args:
      model: a `DeepSeekCausalLM`.
      ids: int32 (B, T) token ids (right-padded rows: mask the padding).
      mask: (B, T), 1 where a token is scored (default: every token but the first).
      training: the model's training mode (MoE capacity, dropout).
      moe_capacity_factor: overrides the MoE layers' capacity factor (DPO scores with
        `layers.moe.dropless_factor`, so padding and other rows never drop a token).
      temperature: score under softmax(logits / temperature) (`next_token_scores`).
    """
    logits = model(ids, training=training,
                   moe_capacity_factor=moe_capacity_factor)                # (B, T, V)
    return next_token_scores(logits, ids, mask, temperature)


def length_mask(lengths: tf.Tensor, width) -> tf.Tensor:
    """(B, T) float32: 1 at t < lengths[b] (the real tokens of right-padded rows)."""
    return tf.cast(tf.range(width)[tf.newaxis, :] < lengths[:, tf.newaxis], tf.float32)


def perplexity_scorer(data_cfg, batch_size: int = 16):
    """`texts -> per-token perplexities` (list of floats) under the model and tokenizer of
    workdir `data_cfg.ppl_filter_model` (prepare's perplexity filter), or None when the
    filter is off. Each text's first `data_cfg.seq_len` tokens (at most the model's
    context) are scored in batches of `batch_size`, padded to one shape."""
    import math

    import numpy as np

    from deepseek_tf.errors import UserError
    from deepseek_tf.workdir import load_run_tokenizer, load_workdir

    if not data_cfg.ppl_filter_model:
        return None
    try:
        model, exp = load_workdir(data_cfg.ppl_filter_model)
        tok = load_run_tokenizer(data_cfg.ppl_filter_model, exp)
    except UserError as e:
        raise UserError(f"--data.ppl_filter_model: {e}") from e
    width = min(data_cfg.seq_len, exp.model.max_position_embeddings)
    fn = tf.function(lambda ids, mask: tf.reduce_sum(score_tokens(model, ids, mask)[0], 1),
                     autograph=False)

    def score(texts: list[str]) -> list[float]:
        out = []
        for lo in range(0, len(texts), batch_size):
            ids = np.full((batch_size, width), tok.pad_id, np.int32)
            lengths = np.zeros(batch_size, np.int32)
            for i, text in enumerate(texts[lo:lo + batch_size]):
                enc = tok.encode(text, add_eos=False)[:width]
                ids[i, :len(enc)], lengths[i] = enc, len(enc)
            mask = length_mask(tf.constant(lengths), width).numpy()
            mask[:, 0] = 0.0  # nothing predicts the first token
            nll = -fn(tf.constant(ids), tf.constant(mask)).numpy()
            n = len(texts[lo:lo + batch_size])
            out += [math.exp(min(nll[i] / max(lengths[i] - 1, 1), 80.0)) for i in range(n)]
        return out

    return score
