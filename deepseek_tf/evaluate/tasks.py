"""The three evaluation tasks on a loaded model.

- `lm`: perplexity and next-token accuracy. Text records (`{"text": ...}` or plain
  files) count every token after the first; alpaca/sharegpt records count the
  answer tokens (the training loss mask) rendered with the run's chat template.
- `generate`: greedy answers to prompts (alpaca `instruction` + `input`, or
  `prompt`), scored against the reference (`output`, `reference` or `answer`) with
  exact match, BLEU and ROUGE (evaluate/metrics.py).
- `classify`: `{"text", "label"}` records; every candidate label (all labels seen in
  the file) is scored by its log-likelihood after the text (summed, or its mean per
  label token with `normalize="tokens"`); the best one is the prediction. Labels are
  always scored whole: a text too long for `max_length` is cut from the left.
  Accuracy and macro/micro F1.

`lm` and `classify` score with one traced function (`token_scorer`, one forward pass
per batch through `scoring.score_tokens`) whatever the batch widths.

Example:
    >>> result = run_task("generate", model, tok, records, template, max_length=256)
    >>> result["metrics"]["exact_match"]
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from deepseek_tf.data.records import REFERENCE_KEYS, prompt_and_reference
from deepseek_tf.data.sft import BadSample, encode, parse_record
from deepseek_tf.errors import UserError
from deepseek_tf.evaluate import metrics
from deepseek_tf.generate.run import pad_right, run_batches
from deepseek_tf.scoring import length_mask, score_tokens
from deepseek_tf.generate.text import prompt_ids, stop_sequences, stop_strings


def detect_task(record: dict) -> str:
    """The task a record's fields suggest (for --task=auto)."""
    if "label" in record:
        return "classify"
    if any(k in record for k in REFERENCE_KEYS):
        return "generate"
    return "lm"


def _sft_format(record: dict) -> str | None:
    if "conversations" in record or "messages" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return None


def _batches(rows: list, size: int):
    for lo in range(0, len(rows), size):
        yield rows[lo:lo + size]


def lm_task(model, tok, records: list, template, max_length: int, batch_size: int = 8) -> dict:
    """Perplexity and token accuracy (see module doc)."""
    seqs = []  # (ids, mask): mask[t] = 1 if token t is scored
    for i, r in enumerate(records):
        fmt = _sft_format(r)
        if fmt:
            try:
                enc = encode(parse_record(r, fmt), template, tok, max_length)
            except BadSample as e:
                raise UserError(f"record {i + 1}: {e}") from e
            if enc is not None:
                seqs.append((enc[0], enc[1].astype(np.float32)))
            continue
        if "text" not in r:
            raise UserError(f"record {i + 1} has no 'text' (or alpaca/sharegpt) field.")
        ids = tok.encode(r["text"], add_bos=True, add_eos=True)
        for lo in range(0, max(len(ids) - 1, 1), max_length - 1):  # windows share one token
            w = np.asarray(ids[lo:lo + max_length], np.int32)
            if len(w) > 1:
                seqs.append((w, np.ones(len(w), np.float32)))
    nll = hits = count = 0.0
    step = token_scorer(model)
    for batch in _batches(seqs, batch_size):
        ids, lengths = pad_right([s for s, _ in batch], tok.pad_id)
        mask, _ = pad_right([m for _, m in batch])
        mask[:, 0] = 0  # the first token is never predicted
        out = step(ids, lengths, mask.astype(np.float32))
        nll = nll - float(tf.reduce_sum(out[0]))
        hits, count = hits + float(tf.reduce_sum(out[1])), count + float(tf.reduce_sum(out[2]))
    if not count:
        raise UserError("no token to score in the data.")
    loss = nll / count
    return {"metrics": {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                        "token_accuracy": hits / count, "tokens": count,
                        "samples": len(records)}}


#: The one input signature of `token_scorer`: any batch size and width trace once.
SCORE_SPECS = (tf.TensorSpec([None, None], tf.int32, name="ids"),
               tf.TensorSpec([None], tf.int32, name="lengths"),
               tf.TensorSpec([None, None], tf.float32, name="mask"))


def token_scorer(model):
    """A tf.function `(ids, lengths, mask) -> (log-prob sum, argmax hits, scored tokens)`,
    each (B,), of right-padded rows from one forward pass (`scoring.score_tokens`);
    mask[t] scores token t. Traced once, for every batch size and width."""

    def step(ids, lengths, mask):
        valid = length_mask(lengths, tf.shape(ids)[1]) * mask
        log_probs, hits = score_tokens(model, ids, valid)
        return (tf.reduce_sum(log_probs, 1), tf.reduce_sum(hits, 1),
                tf.reduce_sum(valid, 1))

    return tf.function(step, input_signature=SCORE_SPECS, autograph=False)


def generate_task(model, tok, records: list, template, max_length: int, batch_size: int = 8,
                  max_new_tokens: int = 128, jit_compile="auto") -> dict:
    """Greedy generation scored with exact match, BLEU and ROUGE."""
    pairs = [prompt_and_reference(r, i) for i, r in enumerate(records)]
    prompts = [prompt_ids(p, tok, template, records[i].get("system", ""))
               for i, (p, _) in enumerate(pairs)]
    longest = max(len(p) for p in prompts)
    if not max_length:  # the smallest cache that fits: attention cost grows with it
        max_length = min(model.config.max_position_embeddings, longest + max_new_tokens)
    if longest >= max_length:
        raise UserError(f"a prompt has {longest} tokens, more than --max_length={max_length}.")
    new = min(max_new_tokens, max_length - longest)
    results = run_batches(model, tok, prompts, max_length, stop_sequences(tok, template),
                          stop_strings(tok, template), batch_size, jit_compile=jit_compile,
                          max_new_tokens=new, temperature=0.0)
    preds = [r["completion"] for r in results]
    refs = [ref for _, ref in pairs]
    samples = [{"prompt": p, "reference": ref, "prediction": pred,
                "exact": metrics.normalize(pred) == metrics.normalize(ref)}
               for (p, ref), pred in zip(pairs, preds)]
    return {"metrics": {**metrics.generation_scores(preds, refs), "samples": len(records)},
            "samples": samples}


#: How `classify` compares labels: the summed log-likelihood of a label's tokens, or
#: its mean per token (labels of different token lengths on an equal footing).
NORMALIZE = ("none", "tokens")


def fit_prompt(prompt: np.ndarray, room: int, bos_id: int) -> np.ndarray:
    """`prompt` cut from the left to at most `room` tokens, its BOS kept first."""
    if len(prompt) <= room:
        return prompt
    head = prompt[:1] if len(prompt) and prompt[0] == bos_id else prompt[:0]
    return np.concatenate([head, prompt[len(prompt) - (room - len(head)):]])


def classify_task(model, tok, records: list, template, max_length: int, batch_size: int = 8,
                  normalize: str = "none", log=print) -> dict:
    """Label-likelihood classification: accuracy and macro/micro F1.

    Every label is scored whole: a text that leaves no room for the longest label in
    `max_length` tokens loses its beginning (after BOS), counted in `truncated`."""
    if normalize not in NORMALIZE:
        raise UserError(f"--normalize={normalize} is not one of {', '.join(NORMALIZE)}.")
    for i, r in enumerate(records):
        if not isinstance(r.get("text"), str) or not isinstance(r.get("label"), str):
            raise UserError(f"record {i + 1} needs a text and a label (both strings).")
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise UserError(f"classification needs at least two labels; the data has {labels}.")
    label_ids = [np.asarray(tok.encode(lbl, add_bos=False, add_eos=False), np.int32)
                 for lbl in labels]
    longest = max(len(ids) for ids in label_ids)
    if longest + 2 > max_length:  # BOS + one text token + the label
        raise UserError(f"a label has {longest} tokens: it does not fit after a text in "
                        f"--max_length={max_length}; raise --max_length or shorten the labels.")
    rows, masks, truncated = [], [], 0
    for r in records:
        full = prompt_ids(r["text"], tok, template)
        p = fit_prompt(full, max_length - longest, tok.bos_id)
        truncated += len(p) < len(full)
        for ids in label_ids:
            rows.append(np.concatenate([p, ids]))
            masks.append(np.concatenate([np.zeros(len(p), np.float32),
                                         np.ones(len(ids), np.float32)]))
    if truncated:
        log(f"{truncated} of {len(records)} texts were cut from the left to fit their "
            f"labels in --max_length={max_length} tokens")
    step = token_scorer(model)
    scores = []
    for lo in range(0, len(rows), batch_size):
        ids, lengths = pad_right(rows[lo:lo + batch_size], tok.pad_id)
        mask, _ = pad_right(masks[lo:lo + batch_size])
        logp, _, count = step(ids, lengths, mask.astype(np.float32))
        scores += list(logp.numpy() / (count.numpy() if normalize == "tokens" else 1.0))
    scores = np.asarray(scores, np.float64).reshape(len(records), len(labels))
    predicted = [labels[k] for k in scores.argmax(1)]
    truth = [r["label"] for r in records]
    key = "log_likelihoods" if normalize == "none" else "mean_log_likelihoods"
    samples = [{"text": r["text"], "label": t, "prediction": p, key: dict(zip(labels, map(float, s)))}
               for r, t, p, s in zip(records, truth, predicted, scores)]
    return {"metrics": {**metrics.classification_scores(truth, predicted),
                        "samples": len(records), "labels": len(labels),
                        "truncated": truncated},
            "samples": samples, "normalize": normalize}


TASKS = {"lm": lm_task, "generate": generate_task, "classify": classify_task}


def run_task(task: str, model, tok, records: list, template, max_length: int, **options):
    """Runs `task` ("lm", "generate" or "classify") and returns {"metrics", "samples"}."""
    if not records:
        raise UserError("the evaluation data holds no record.")
    if task != "generate":
        options.pop("max_new_tokens", None)
        options.pop("jit_compile", None)
    if task != "classify":
        options.pop("normalize", None)
        options.pop("log", None)
    return TASKS[task](model, tok, records, template, max_length, **options)
