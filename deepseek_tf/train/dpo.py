"""Preference tuning (`--train.stage=dpo`): DPO / IPO on (prompt, chosen, rejected) pairs.

Data (`--data.inputs`, JSON Lines or a JSON array), rendered with the run's chat
template exactly like SFT samples (data/sft.py), the loss mask marking the answer:
  alpaca   {"instruction", "input"?, "system"?, "history"?, "chosen", "rejected"}
  sharegpt {"conversations": [...prompt turns], "chosen": {from, value}, "rejected": ...}
  plain    {"prompt", "chosen", "rejected"}
A seeded `val_size` share is held out for evaluation. Pairs are small: they are
tokenized in memory (no prepare step) into a checkpointable tf.data pipeline.

Loss, with log-ratios r = log pi(y|x) - log pi_ref(y|x) summed over answer tokens:
  sigmoid  -log sigmoid(beta (r_chosen - r_rejected))  (with label smoothing eps:
           -(1-eps) log sigmoid(z) - eps log sigmoid(-z))
  ipo      (h - 1/(2 beta))^2 with h the difference of length-averaged log-ratios
The reference is a frozen copy of the `--train.init_from` weights (adapters merged),
required; `--dpo.reference=precomputed` scores every training pair with it once before
training instead of at every step (validation pairs are always scored live).
Logged: rewards/chosen = beta r_chosen, rewards/rejected, margin (their difference)
and reward accuracy (share of pairs with margin > 0), to TensorBoard and log.jsonl. LoRA, freeze and full fine-tuning all apply. One device (no strategy).

Example:
    >>> exp = Experiment(..., train=TrainConfig(stage="dpo", init_from="runs/sft"))
    >>> result = train_dpo(exp, "runs/dpo")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config import DPOConfig, Experiment
from deepseek_tf.data.sft import BadSample, Conversation, encode, parse_record
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.lora import merged_model, save_adapter
from deepseek_tf.model import DeepSeekCausalLM, count_params
from deepseek_tf.scoring import score_tokens
from deepseek_tf.train import checkpoint as ckpt_lib
from deepseek_tf.train import finetune
from deepseek_tf.train.logger import MetricLogger, plot_losses, truncate_log
from deepseek_tf.train.optimizer import make_optimizer
from deepseek_tf.train.strategy import Role
from deepseek_tf.workdir_files import CONFIG_FILE


def pair_conversations(record: dict) -> tuple[Conversation, Conversation]:
    """(chosen, rejected) conversations of one preference record."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if chosen is None or rejected is None:
        raise BadSample("a pair needs 'chosen' and 'rejected'")
    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        return tuple(parse_record({**record, key: list(record[key]) + [answer]}, "sharegpt")
                     for answer in (chosen, rejected))
    base = dict(record)
    if "prompt" in base and "instruction" not in base:
        base["instruction"] = base.pop("prompt")
    base.pop("chosen"), base.pop("rejected")
    return tuple(parse_record({**base, "output": answer}, "alpaca")
                 for answer in (chosen, rejected))


def encode_pairs(records: list[dict], template, tok, seq_len: int) -> dict[str, np.ndarray]:
    """Padded int32 ids (N, 2, seq_len) and float32 answer masks of the pairs."""
    ids = np.full((len(records), 2, seq_len), tok.pad_id, np.int32)
    mask = np.zeros((len(records), 2, seq_len), np.float32)
    for i, record in enumerate(records):
        try:
            convs = pair_conversations(record)
        except BadSample as e:
            raise UserError(f"preference record {i + 1}: {e}.") from e
        for j, conv in enumerate(convs):
            enc = encode(conv, template, tok, seq_len)
            if enc is None:
                raise UserError(f"preference record {i + 1}: no answer token left within "
                                f"--data.seq_len={seq_len}.")
            n = len(enc[0])
            ids[i, j, :n], mask[i, j, :n] = enc[0], enc[1]
    return {"ids": ids, "mask": mask}


def split_pairs(records: list[dict], val_size: float) -> tuple[list, list]:
    """(train, validation) by a hash of each record: deterministic, order-independent."""
    n_val = int(val_size) if val_size >= 1 else int(round(val_size * len(records)))
    keyed = sorted(records, key=lambda r: hashlib.sha256(repr(sorted(r.items())).encode())
                   .hexdigest())
    val = keyed[:n_val]
    return [r for r in records if r not in val], val


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg: DPOConfig,
             len_chosen=None, len_rejected=None):
    """Per-pair losses and rewards from summed answer log-probs (float32, (B,) each).

    Returns (loss (B,), reward_chosen (B,), reward_rejected (B,))."""
    r_c, r_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if cfg.loss == "ipo":
        h = r_c / len_chosen - r_r / len_rejected
        loss = tf.square(h - 1.0 / (2.0 * cfg.beta))
    else:
        z = cfg.beta * (r_c - r_r)
        eps = cfg.label_smoothing
        loss = -(1.0 - eps) * tf.math.log_sigmoid(z) - eps * tf.math.log_sigmoid(-z)
    return loss, cfg.beta * r_c, cfg.beta * r_r


def answer_logps(model, ids, mask, training=False):
    """Summed log p of the masked (answer) tokens per row: (R,) float32, and their counts."""
    mask = tf.cast(mask, tf.float32)
    logp, _ = score_tokens(model, ids, mask, training=training)           # (R, T)
    return tf.reduce_sum(logp, axis=1), tf.reduce_sum(mask[:, 1:], axis=1)


def make_dpo_step(model, ref, optimizer, cfg: DPOConfig, clip_norm: float, jit: bool):
    """A compiled step (batch -> metrics dict) and an eval function (batch -> metrics)."""
    variables = model.trainable_variables

    def metrics_of(batch, training):
        b = tf.shape(batch["ids"])[0]
        ids = tf.reshape(batch["ids"], [2 * b, -1])                       # chosen, rejected
        mask = tf.reshape(batch["mask"], [2 * b, -1])
        pol, n = answer_logps(model, ids, mask, training)
        ref_lp = batch["ref"] if "ref" in batch else answer_logps(ref, ids, mask)[0]
        pol, ref_lp, n = (tf.reshape(x, [b, 2]) for x in (pol, tf.stop_gradient(ref_lp), n))
        loss, rc, rr = dpo_loss(pol[:, 0], pol[:, 1], ref_lp[:, 0], ref_lp[:, 1], cfg,
                                n[:, 0], n[:, 1])
        return tf.reduce_mean(loss), {
            "rewards/chosen": tf.reduce_mean(rc), "rewards/rejected": tf.reduce_mean(rr),
            "rewards/margin": tf.reduce_mean(rc - rr),
            "rewards/accuracy": tf.reduce_mean(tf.cast(rc > rr, tf.float32)),
            "logps/chosen": tf.reduce_mean(pol[:, 0]), "logps/rejected": tf.reduce_mean(pol[:, 1])}

    def grads_of(batch):
        with tf.GradientTape() as tape:
            loss, m = metrics_of(batch, True)
        grads = tape.gradient(loss, variables)
        norm = tf.linalg.global_norm(grads)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=norm)
        return grads, loss, norm, m

    grads_fn = tf.function(grads_of, jit_compile=jit)

    @tf.function
    def step(iterator):
        grads, loss, norm, m = grads_fn(next(iterator))
        optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss, "grad_norm": norm, **m}

    @tf.function
    def evaluate(batch):
        loss, m = metrics_of(batch, False)
        return {"loss": loss, **m}

    return step, evaluate


def _reference(exp: Experiment, log) -> keras.Model:
    from deepseek_tf.workdir import load_workdir

    src, _ = load_workdir(exp.train.init_from)
    ref = merged_model(src)
    ref.trainable = False
    log(f"reference model: the frozen weights of {exp.train.init_from}")
    return ref


def precompute_reference(ref, pairs: dict, batch_size: int) -> np.ndarray:
    """float32 (N, 2) summed answer log-probs of every pair under the reference."""
    fn = tf.function(lambda ids, mask: answer_logps(ref, ids, mask)[0])
    out = []
    for lo in range(0, len(pairs["ids"]), batch_size):
        ids, mask = pairs["ids"][lo:lo + batch_size], pairs["mask"][lo:lo + batch_size]
        b = len(ids)
        lp = fn(tf.constant(ids.reshape(2 * b, -1)), tf.constant(mask.reshape(2 * b, -1)))
        out.append(lp.numpy().reshape(b, 2))
    return np.concatenate(out).astype(np.float32)


def _datasets(exp: Experiment, tok, log, ref):
    from deepseek_tf.data.records import read_records

    if not exp.data.inputs:
        raise ConfigError("--train.stage=dpo needs --data.inputs=PAIRS.jsonl (prompt/"
                          "instruction, chosen, rejected).")
    records = read_records(list(exp.data.input_list), exp.data.max_samples)
    train_r, val_r = split_pairs(records, exp.data.val_size)
    if not train_r:
        raise UserError(f"--data.inputs={exp.data.inputs} holds no training pair.")
    template = TEMPLATES[exp.data.template]
    tr = encode_pairs(train_r, template, tok, exp.data.seq_len)
    log(f"preference pairs: {len(train_r)} train / {len(val_r)} validation, template "
        f"{exp.data.template}")
    if exp.dpo.reference == "precomputed":
        tr["ref"] = precompute_reference(ref, tr, exp.train.batch_size)
        log(f"reference log-probs precomputed for {len(train_r)} pairs")
    ds = tf.data.Dataset.from_tensor_slices(tr).repeat().shuffle(
        max(len(train_r), 1), seed=exp.train.seed).batch(exp.train.batch_size, drop_remainder=True)
    val = encode_pairs(val_r, template, tok, exp.data.seq_len) if val_r else None
    return ds, val


def train_dpo(exp: Experiment, workdir: str, log=print) -> dict:
    """Runs DPO/IPO in `workdir` (resuming from its latest checkpoint); returns the last
    train and eval metrics."""
    from deepseek_tf.workdir import load_experiment, load_run_tokenizer

    tcfg = exp.train
    if not tcfg.init_from:
        raise ConfigError("--train.stage=dpo needs --train.init_from=WORKDIR (the policy's "
                          "start and the frozen reference).")
    workdir = os.path.abspath(workdir)
    tok = load_run_tokenizer(tcfg.init_from, load_experiment(tcfg.init_from))
    os.makedirs(workdir, exist_ok=True)
    if tcfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(tcfg.seed)  # before the data: its shuffle seeds depend on it
    ref = _reference(exp, log)
    train_ds, val = _datasets(exp, tok, log, ref)
    exp.save(os.path.join(workdir, CONFIG_FILE))
    tok.save(os.path.join(workdir, "tokenizer"))
    model = DeepSeekCausalLM(exp.model)
    finetune.prepare_model(model, exp, log)
    optimizer = make_optimizer(exp.optim, exp.decay_steps, model)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    rng = tf.random.Generator.from_seed(tcfg.seed)
    it = iter(train_ds)
    ckpts = ckpt_lib.RunCheckpoints(workdir, {"model": model, "optimizer": optimizer,
                                              "step": step_var, "rng": rng}, it, Role(),
                                    tcfg.keep_checkpoints)
    start = ckpts.restore(log=log)
    truncate_log(workdir, start)
    trainable, total = count_params(model)
    log(f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
    step_fn, eval_fn = make_dpo_step(model, ref, optimizer, exp.dpo, exp.optim.clip_norm,
                                     tcfg.jit_compile)
    logger = MetricLogger(workdir, tcfg.steps)
    last_train, last_eval, t0 = {}, {}, time.time()
    with contextlib.closing(logger):
        for step in range(start + 1, tcfg.steps + 1):
            out = {k: float(v) for k, v in step_fn(it).items()}
            step_var.assign(step)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                last_train = out
                logger.write_event(step, "train", out, _line(step, tcfg.steps, out))
            if val is not None and ((tcfg.eval_every and step % tcfg.eval_every == 0)
                                    or step == tcfg.steps):
                last_eval = _evaluate(eval_fn, val, tcfg.batch_size)
                logger.write_event(step, "eval", last_eval,
                                   _line(step, tcfg.steps, last_eval, "eval"))
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                ckpts.save(step)
                logger.flush()
    if tcfg.finetuning_type == "lora":
        log(f"wrote the adapter to {save_adapter(model, workdir, exp.lora, tcfg.init_from)}")
    plot_losses(workdir)
    log(f"done: step {tcfg.steps}, {time.time() - t0:.1f}s; workdir: {workdir}")
    return {"step": tcfg.steps, "train": last_train, "eval": last_eval}


def _evaluate(eval_fn, val: dict, batch_size: int) -> dict:
    n = len(val["ids"])
    sums: dict[str, float] = {}
    for lo in range(0, n, batch_size):
        batch = {k: tf.constant(v[lo:lo + batch_size]) for k, v in val.items()}
        rows = len(batch["ids"])
        for k, v in eval_fn(batch).items():
            sums[k] = sums.get(k, 0.0) + float(v) * rows
    return {k: v / n for k, v in sums.items()}


def _line(step: int, total: int, m: dict, kind: str = "train") -> str:
    head = f"step {step:>6}/{total} | " + ("eval " if kind == "eval" else "")
    return (head + f"dpo loss {m['loss']:.4f} | reward acc {m['rewards/accuracy']:.3f} | "
            f"margin {m['rewards/margin']:.3f} (chosen {m['rewards/chosen']:.3f}, rejected "
            f"{m['rewards/rejected']:.3f})")
