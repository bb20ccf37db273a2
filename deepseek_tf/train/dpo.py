"""Preference tuning (`--train.stage=dpo`): DPO / IPO / ORPO / SimPO on (prompt, chosen,
rejected) pairs.

An objective of the one Runner (train/objectives.py, train/loop.py): the same step,
precision, remat, gradient accumulation, strategies, NaN recovery, checkpoints, best
checkpoint and early stopping (on the eval DPO loss) as every stage.

Data (`--data.inputs`, JSON Lines or a JSON array), rendered with the run's chat
template exactly like SFT samples (data/sft.py), the loss mask marking the answer:
  alpaca   {"instruction", "input"?, "system"?, "history"?, "chosen", "rejected"}
  sharegpt {"conversations": [...prompt turns], "chosen": {from, value}, "rejected": ...}
  plain    {"prompt", "chosen", "rejected"}
A seeded `val_size` share is held out; every evaluation scores all of it. Pairs are
small: they are tokenized in memory (no prepare step); the pipeline shuffles indices.

Loss, with log-ratios r = log pi(y|x) - log pi_ref(y|x) summed over answer tokens:
  sigmoid  -log sigmoid(beta (r_chosen - r_rejected))  (with label smoothing eps:
           -(1-eps) log sigmoid(z) - eps log sigmoid(-z))
  ipo      (h - 1/(2 beta))^2 with h the difference of length-averaged log-ratios
and, with a = log pi(y|x) / |y| the length-averaged answer log-prob (no reference):
  orpo     -a_chosen - beta log sigmoid(log odds(chosen) - log odds(rejected)), log odds
           = a - log(1 - exp(a)) (Hong et al. 2024: the SFT term plus lambda = beta
           times the odds-ratio term)
  simpo    -log sigmoid(beta (a_chosen - a_rejected) - gamma) (Meng et al. 2024)
The reference is the `--train.init_from` weights (adapters merged); the policy starts
there (required for every loss). orpo and simpo log rewards = beta a.

One scoring mode for policy and reference, so that policy == reference gives a margin
of exactly 0: log-probs come from `scoring.score_tokens` with dropout off (the model's
and LoRA's, as TRL does by default) and MoE layers dropless (no expert capacity, so
neither padding nor the other pairs of the batch can drop a token: a pair's log-prob
depends on the weights and the pair alone). Without XLA the dropless buffers take the
largest expert load; under XLA every expert buffer holds all tokens (static shapes, the
cost of running every expert on every token). MTP modules are frozen (the loss does not
use them) and the router biases stay as they are (no token loads drive them).
`--dpo.reference=model` (default) runs a frozen reference model beside the policy in
the same step on the same batch: the margin at the first step is exactly 0.
`--dpo.reference=precomputed` scores every pair once before training instead (one
forward fewer per step, no second model in memory during training): the same
function, equal to rounding (other batch shapes, no XLA).
Logged: rewards/chosen = beta r_chosen, rewards/rejected, rewards/margin (their
difference), rewards/accuracy (share of pairs with margin > 0), logps/chosen and
logps/rejected, to TensorBoard and log.jsonl (eval: the same on the held-out pairs).

Example:
    >>> exp = Experiment(..., train=TrainConfig(stage="dpo", init_from="runs/sft"))
    >>> result = train(exp, "runs/dpo")   # deepseek_tf.train.loop
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import tensorflow as tf

from deepseek_tf.config import DPOConfig, Experiment
from deepseek_tf.data.sft import BadSample, Conversation, encode, parse_record
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.layers.moe import dropless_factor
from deepseek_tf.model import DeepSeekCausalLM
from deepseek_tf.scoring import score_tokens
from deepseek_tf.train import precision
from deepseek_tf.train.finetune import load_init_weights
from deepseek_tf.train.objectives import Objective, check_workdir

#: The per-pair sums of the step and the evaluation, logged as their means.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
         "logps/chosen", "logps/rejected")


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
    if cfg.reference_free:  # rewards: beta x the length-averaged log-probs
        a_c, a_r = policy_chosen / len_chosen, policy_rejected / len_rejected
        if cfg.loss == "simpo":
            loss = -tf.math.log_sigmoid(cfg.beta * (a_c - a_r) - cfg.gamma)
        else:  # orpo: log odds(y) = log p - log(1 - p), p the length-averaged probability
            log_odds = (a_c - a_r) - (tf.math.log(-tf.math.expm1(a_c))
                                      - tf.math.log(-tf.math.expm1(a_r)))
            loss = -a_c - cfg.beta * tf.math.log_sigmoid(log_odds)
        return loss, cfg.beta * a_c, cfg.beta * a_r
    if cfg.loss == "ipo":
        h = r_c / len_chosen - r_r / len_rejected
        loss = tf.square(h - 1.0 / (2.0 * cfg.beta))
    else:
        z = cfg.beta * (r_c - r_r)
        eps = cfg.label_smoothing
        loss = -(1.0 - eps) * tf.math.log_sigmoid(z) - eps * tf.math.log_sigmoid(-z)
    return loss, cfg.beta * r_c, cfg.beta * r_r


def answer_logps(model, ids, mask, xla=False):
    """Summed log p of the masked (answer) tokens per row, (R,) float32, and their
    counts, in DPO's scoring mode (no dropout, dropless MoE; static buffers for XLA)."""
    mask = tf.cast(mask, tf.float32)
    logp, _ = score_tokens(model, ids, mask, training=False,
                           moe_capacity_factor=dropless_factor(model.config, xla))  # (R, T)
    return tf.reduce_sum(logp, axis=1), tf.reduce_sum(mask[:, 1:], axis=1)


def precompute_reference(ref, pairs: dict, batch_size: int) -> np.ndarray:
    """float32 (N, 2) summed answer log-probs of every pair under the reference."""
    fn = tf.function(lambda ids, mask: answer_logps(ref, ids, mask)[0], autograph=False)
    out = []
    for lo in range(0, len(pairs["ids"]), batch_size):
        ids, mask = pairs["ids"][lo:lo + batch_size], pairs["mask"][lo:lo + batch_size]
        b = len(ids)
        lp = fn(tf.constant(ids.reshape(2 * b, -1)), tf.constant(mask.reshape(2 * b, -1)))
        out.append(lp.numpy().reshape(b, 2))
    return np.concatenate(out).astype(np.float32)


def reference_model(exp: Experiment, log) -> DeepSeekCausalLM:
    """The frozen reference: `--train.init_from`'s weights (LoRA adapters merged), built
    under the current strategy and dtype policy scopes."""
    ref = DeepSeekCausalLM(exp.model)
    load_init_weights(ref, exp.train.init_from, log=lambda *_: None)
    ref.trainable = False
    log(f"reference model: the frozen weights of {exp.train.init_from}")
    return ref


def init_from_records(exp: Experiment, workdir: str, inputs: str, unit: str,
                      why_val: str) -> tuple:
    """(the `--train.init_from` run's tokenizer, train records, held-out records) of a
    stage that starts from that run and reads `--data.inputs` records (DPO's pairs,
    GRPO's prompts), split by `split_pairs`; one-line errors for what is missing."""
    from deepseek_tf.data.records import read_records
    from deepseek_tf.workdir import load_experiment, load_run_tokenizer

    stage, src = exp.train.stage, exp.train.init_from
    if not src:
        raise ConfigError(f"--train.stage={stage} needs --train.init_from=WORKDIR (the "
                          f"policy's start and the frozen reference).")
    if not exp.data.inputs:
        raise ConfigError(f"--train.stage={stage} needs --data.inputs={inputs}.")
    check_workdir(workdir)
    tok = load_run_tokenizer(src, load_experiment(src))
    records = read_records(list(exp.data.input_list), exp.data.max_samples)
    train_r, val_r = split_pairs(records, exp.data.val_size)
    if not train_r:
        raise UserError(f"--data.inputs={exp.data.inputs} holds no training {unit}.")
    if not val_r:
        raise ConfigError(f"--data.val_size={exp.data.val_size:g} holds out no {unit} of "
                          f"{len(records)}: {why_val}; raise --data.val_size.")
    return tok, train_r, val_r


def freeze_mtp(model) -> None:
    """MTP modules frozen: a loss on whole answers (DPO, GRPO) does not use them (no
    gradient, no weight decay)."""
    for module in model.mtp:
        module.trainable = False


def _indexed(arrays: dict, ctx) -> tf.data.Dataset:
    """This worker's share of the pair indices (rows are gathered after shuffling, so
    a checkpointed shuffle buffer holds indices, not pairs)."""
    ds = tf.data.Dataset.range(len(arrays["ids"]))
    if ctx is not None and ctx.num_input_pipelines > 1:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds


def _gather(arrays: dict):
    tensors = {k: tf.constant(v) for k, v in arrays.items()}
    return lambda i: {k: tf.gather(v, i) for k, v in tensors.items()}


class DPOObjective(Objective):
    """`--train.stage=dpo`: see the module doc."""

    examples = "pairs"

    def prepare(self, exp, workdir, role, log):
        self.cfg, self.log = exp.dpo, log
        self.tok, train_r, val_r = init_from_records(
            exp, workdir, "PAIRS.jsonl (prompt/instruction, chosen, rejected)", "pair",
            "DPO evaluates reward accuracy on held-out pairs")
        template = TEMPLATES[exp.data.template]
        self.train_pairs = encode_pairs(train_r, template, self.tok, exp.data.seq_len)
        self.val_pairs = encode_pairs(val_r, template, self.tok, exp.data.seq_len)
        log(f"preference pairs: {len(train_r)} train / {len(val_r)} validation, template "
            f"{exp.data.template}")
        return exp

    def save_tokenizer(self, dst):
        self.tok.save(dst)

    def reference_free(self, exp) -> bool:
        """True when the loss needs no reference model (orpo, simpo)."""
        return exp.dpo.reference_free

    def datasets(self, exp, workdir, ctx):
        tcfg = exp.train
        train, val = dict(self.train_pairs), dict(self.val_pairs)
        if exp.dpo.reference == "precomputed" and not self.reference_free(exp):
            # a plain model, before the strategy's
            with precision.policy_scope(tcfg.precision):
                ref = reference_model(exp, self.log)
            for arrays in (train, val):
                arrays["ref"] = precompute_reference(ref, arrays, tcfg.batch_size)
            self.log(f"reference log-probs precomputed for {len(train['ids'])} + "
                     f"{len(val['ids'])} pairs")
        n_val, global_batch = len(val["ids"]), tcfg.batch_size * ctx.num_replicas_in_sync
        self.n_eval = math.ceil(n_val / global_batch)
        pad = self.n_eval * global_batch - n_val  # rows of weight 0: every replica, every batch
        val = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in val.items()}
        val["valid"] = (np.arange(len(val["ids"])) < n_val).astype(np.float32)
        train["valid"] = np.ones(len(train["ids"]), np.float32)
        n_train = len(train["ids"])
        train_ds = (_indexed(train, ctx).repeat()
                    .shuffle(max(n_train, 1), seed=tcfg.seed, reshuffle_each_iteration=True)
                    .batch(tcfg.batch_size, drop_remainder=True).map(_gather(train))
                    .batch(tcfg.grad_accum_steps, drop_remainder=True))
        eval_ds = _indexed(val, ctx).batch(tcfg.batch_size).map(_gather(val))
        return train_ds, eval_ds

    def build(self, model, exp, log):
        freeze_mtp(model)
        self.reference = None
        if self.reference_free(exp):
            log(f"reference model: none (--dpo.loss={exp.dpo.loss})")
        elif exp.dpo.reference == "model":
            self.reference = reference_model(exp, log)

    def weight(self, batch):
        return tf.reduce_sum(batch["valid"])                               # pairs

    def forward(self, model, batch, training, seed=None, xla=False):
        b = tf.shape(batch["ids"])[0]
        ids = tf.reshape(batch["ids"], [2 * b, -1])                       # chosen, rejected
        mask = tf.reshape(batch["mask"], [2 * b, -1])
        pol, n = answer_logps(model, ids, mask, xla)                      # (2B,)
        if self.cfg.reference_free:
            ref = tf.zeros_like(pol)
        elif "ref" in batch:
            ref = tf.reshape(batch["ref"], [2 * b])
        else:
            ref = tf.stop_gradient(answer_logps(self.reference, ids, mask, xla)[0])
        pol, ref, n = (tf.reshape(x, [b, 2]) for x in (pol, ref, tf.maximum(n, 1.0)))
        loss, rc, rr = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.cfg,
                                n[:, 0], n[:, 1])
        valid = batch["valid"]
        per_pair = (rc, rr, rc - rr, tf.cast(rc > rr, tf.float32), pol[:, 0], pol[:, 1])
        stats = {k: tf.reduce_sum(v * valid) for k, v in zip(STATS, per_pair)}
        return tf.reduce_sum(loss * valid), None, stats

    def step_metrics(self, model, stats, denom, update):
        return {k: stats[k] / denom for k in STATS}

    def eval_batches(self, exp):
        return self.n_eval

    def eval_metrics(self, sums):
        pairs = max(sums["weight"], 1.0)
        return {"loss": sums["loss_sum"] / pairs, **{k: sums[k] / pairs for k in STATS}}

    def log_metrics(self, model, out):
        return {k: float(out[k]) for k in STATS}

    def tokens_per_step(self, exp, replicas):
        return 2 * exp.train.global_batch(replicas) * exp.data.seq_len  # chosen + rejected
