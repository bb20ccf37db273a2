"""The three evaluation tasks on a loaded model.

- `lm`: perplexity and next-token accuracy. Text records (`{"text": ...}` or plain
  files) count every token after the first; alpaca/sharegpt records count the
  answer tokens (the training loss mask) rendered with the run's chat template.
- `generate`: greedy answers to prompts (alpaca `instruction` + `input`, or
  `prompt`), scored against the reference (`output`, `reference` or `answer`) with
  exact match, BLEU and ROUGE (evaluate/metrics.py).
- `classify`: `{"text", "label"}` records; every candidate label (all labels seen in
  the file) is scored by its log-likelihood after the text; the best one is the
  prediction. Accuracy and macro/micro F1.

Example:
    >>> result = run_task("generate", model, tok, records, template, max_length=256)
    >>> result["metrics"]["exact_match"]
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from deepseek_tf.data.sft import BadSample, encode, parse_record
from deepseek_tf.errors import UserError
from deepseek_tf.evaluate import metrics
from deepseek_tf.generate.decode import score_ids
from deepseek_tf.generate.run import pad_right, run_batches
from deepseek_tf.scoring import length_mask, score_tokens
from deepseek_tf.generate.text import prompt_ids, stop_ids, stop_strings

REFERENCE_KEYS = ("output", "reference", "answer")


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
    step = tf.function(_score_step)
    for batch in _batches(seqs, batch_size):
        ids, lengths = pad_right([s for s, _ in batch], tok.pad_id)
        mask, _ = pad_right([m for _, m in batch])
        mask[:, 0] = 0  # the first token is never predicted
        out = step(model, tf.constant(ids), tf.constant(lengths), tf.constant(mask, tf.float32))
        nll, hits, count = nll + float(out[0]), hits + float(out[1]), count + float(out[2])
    if not count:
        raise UserError("no token to score in the data.")
    loss = nll / count
    return {"metrics": {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                        "token_accuracy": hits / count, "tokens": count,
                        "samples": len(records)}}


def _score_step(model, ids, lengths, mask):
    """(nll sum, argmax hits, scored tokens) of right-padded rows from one forward pass;
    mask[t] scores token t."""
    valid = length_mask(lengths, tf.shape(ids)[1]) * mask
    log_probs, hits = score_tokens(model, ids, valid)
    return -tf.reduce_sum(log_probs), tf.reduce_sum(hits), tf.reduce_sum(valid)


def prompt_and_reference(record: dict, i: int) -> tuple[str, str]:
    if "instruction" in record:
        prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        raise UserError(f"record {i + 1} has no prompt (instruction or prompt field).")
    ref = next((record[k] for k in REFERENCE_KEYS if k in record), None)
    if not isinstance(ref, str):
        raise UserError(f"record {i + 1} has no reference text ({', '.join(REFERENCE_KEYS)}).")
    return prompt, ref


def generate_task(model, tok, records: list, template, max_length: int, batch_size: int = 8,
                  max_new_tokens: int = 64, jit_compile: bool = False) -> dict:
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
    results = run_batches(model, tok, prompts, max_length, stop_ids(tok, template),
                          stop_strings(tok, template), batch_size, jit_compile=jit_compile,
                          max_new_tokens=new, temperature=0.0)
    preds = [r["completion"] for r in results]
    refs = [ref for _, ref in pairs]
    samples = [{"prompt": p, "reference": ref, "prediction": pred,
                "exact": metrics.normalize(pred) == metrics.normalize(ref)}
               for (p, ref), pred in zip(pairs, preds)]
    return {"metrics": {**metrics.generation_scores(preds, refs), "samples": len(records)},
            "samples": samples}


def classify_task(model, tok, records: list, template, max_length: int,
                  batch_size: int = 8) -> dict:
    """Label-likelihood classification: accuracy and macro/micro F1."""
    for i, r in enumerate(records):
        if not isinstance(r.get("text"), str) or not isinstance(r.get("label"), str):
            raise UserError(f"record {i + 1} needs a text and a label (both strings).")
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise UserError(f"classification needs at least two labels; the data has {labels}.")
    label_ids = [tok.encode(lbl, add_bos=False, add_eos=False) for lbl in labels]
    rows, spans = [], []
    for r in records:
        p = list(prompt_ids(r["text"], tok, template))
        for ids in label_ids:
            rows.append(np.asarray(p + list(ids), np.int32)[:max_length])
            spans.append((len(p), len(p) + len(ids)))
    step = tf.function(lambda m, ids, n: score_ids(m, ids, n)[0])
    scores = []
    for lo in range(0, len(rows), batch_size):
        ids, lengths = pad_right(rows[lo:lo + batch_size], tok.pad_id)
        lp = step(model, tf.constant(ids), tf.constant(lengths)).numpy()
        for row, (a, b) in zip(lp, spans[lo:lo + batch_size]):
            scores.append(float(row[a:b].sum()))
    scores = np.asarray(scores).reshape(len(records), len(labels))
    predicted = [labels[k] for k in scores.argmax(1)]
    truth = [r["label"] for r in records]
    samples = [{"text": r["text"], "label": t, "prediction": p,
                "log_likelihoods": dict(zip(labels, map(float, s)))}
               for r, t, p, s in zip(records, truth, predicted, scores)]
    return {"metrics": {**metrics.classification_scores(truth, predicted),
                        "samples": len(records), "labels": len(labels)},
            "samples": samples}


TASKS = {"lm": lm_task, "generate": generate_task, "classify": classify_task}


def run_task(task: str, model, tok, records: list, template, max_length: int, **options):
    """Runs `task` ("lm", "generate" or "classify") and returns {"metrics", "samples"}."""
    if not records:
        raise UserError("the evaluation data holds no record.")
    if task != "generate":
        options.pop("max_new_tokens", None)
        options.pop("jit_compile", None)
    return TASKS[task](model, tok, records, template, max_length, **options)
