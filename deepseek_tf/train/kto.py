"""KTO (`--train.stage=kto`): preference tuning on unpaired good / bad answers.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024) learns from single answers
labelled desirable or not, no pairs. An objective of the one Runner, built on the DPO
stage (train/dpo.py): the same data rendering, reference (`--dpo.reference`: a frozen
copy of `--train.init_from`, or precomputed), scoring mode, held-out split and metrics
plumbing.

Data (`--data.inputs`): records with a prompt (alpaca `instruction` + `input`, or
`prompt`), an answer (`completion` or `output`) and a boolean `label` (true =
desirable), as TRL's unpaired preference format.

Loss, with r = log pi(y|x) - log pi_ref(y|x) summed over answer tokens and z0 the
reference point, the batch's KL estimate max(0, mean over rows of log pi(y'|x) - log
pi_ref(y'|x)) on mismatched answers y' (each prompt with the next record's answer, as
TRL builds them), held constant (no gradient):
  desirable    desirable_weight   (1 - sigmoid(beta (r - z0)))
  undesirable  undesirable_weight (1 - sigmoid(beta (z0 - r)))
with `--dpo.beta`, `--dpo.desirable_weight`, `--dpo.undesirable_weight`. The KL estimate
is per micro-batch (one replica's rows).

Logged: kl (z0), rewards/desirable and rewards/undesirable (mean beta r of each kind).

Example:
    >>> exp = Experiment(..., train=TrainConfig(stage="kto", init_from="runs/sft"))
    >>> result = train(exp, "runs/kto")   # deepseek_tf.train.loop
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.train.dpo import DPOObjective, answer_logps, encode_pairs, init_from_records

STATS = ("kl", "rewards/desirable", "rewards/undesirable", "desirable")


def as_pairs(records: list[dict]) -> tuple[list[dict], list[float]]:
    """(pair records: chosen = the record's answer, rejected = the next record's answer
    (the mismatched answer of the KL estimate), labels 1.0 / 0.0)."""
    answers, labels, bases = [], [], []
    for i, r in enumerate(records):
        answer = r.get("completion", r.get("output"))
        if not isinstance(answer, str) or not isinstance(r.get("label"), bool):
            raise UserError(f"KTO record {i + 1} needs an answer (completion or output) and "
                            f"a boolean label (true = desirable).")
        answers.append(answer)
        labels.append(float(r["label"]))
        bases.append({k: v for k, v in r.items() if k not in ("completion", "output", "label")})
    n = len(records)
    return ([{**b, "chosen": answers[i], "rejected": answers[(i + 1) % n]}
             for i, b in enumerate(bases)], labels)


def kto_loss(r, z0, label, cfg):
    """Per-row KTO losses (B,) of log-ratios `r` (B,), reference point `z0` and 0/1
    `label` (B,) (1 = desirable)."""
    good = cfg.desirable_weight * (1.0 - tf.sigmoid(cfg.beta * (r - z0)))
    bad = cfg.undesirable_weight * (1.0 - tf.sigmoid(cfg.beta * (z0 - r)))
    return label * good + (1.0 - label) * bad


class KTOObjective(DPOObjective):
    """`--train.stage=kto`: see the module doc."""

    examples = "answers"

    def prepare(self, exp, workdir, role, log):
        if exp.dpo.loss != "sigmoid" or exp.dpo.label_smoothing:
            raise ConfigError("--dpo.loss and --dpo.label_smoothing are DPO's; KTO has its own "
                              "loss: drop them with --train.stage=kto.")
        self.cfg, self.log = exp.dpo, log
        self.tok, train_r, val_r = init_from_records(
            exp, workdir, "ANSWERS.jsonl (prompt/instruction, completion/output, label)",
            "answer", "KTO evaluates its loss and rewards on held-out answers")
        template = TEMPLATES[exp.data.template]
        for name, records in (("train_pairs", train_r), ("val_pairs", val_r)):
            pairs, labels = as_pairs(records)
            arrays = encode_pairs(pairs, template, self.tok, exp.data.seq_len)
            arrays["label"] = np.array(labels, np.float32)
            setattr(self, name, arrays)
        log(f"KTO answers: {len(train_r)} train / {len(val_r)} validation "
            f"({int(self.train_pairs['label'].sum())} desirable), template {exp.data.template}")
        return exp

    def reference_free(self, exp) -> bool:
        return False

    def forward(self, model, batch, training, seed=None, xla=False):
        b = tf.shape(batch["ids"])[0]
        ids = tf.reshape(batch["ids"], [2 * b, -1])                       # answer, mismatched
        mask = tf.reshape(batch["mask"], [2 * b, -1])
        pol, _ = answer_logps(model, ids, mask, xla)                       # (2B,)
        if "ref" in batch:
            ref = tf.reshape(batch["ref"], [2 * b])
        else:
            ref = tf.stop_gradient(answer_logps(self.reference, ids, mask, xla)[0])
        ratio = tf.reshape(pol - ref, [b, 2])
        valid, label = batch["valid"], batch["label"]
        kl = tf.reduce_sum(ratio[:, 1] * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)
        z0 = tf.stop_gradient(tf.maximum(kl, 0.0))
        r = ratio[:, 0]
        loss = kto_loss(r, z0, label, self.cfg)
        rewards = self.cfg.beta * r * valid
        stats = {"kl": z0 * tf.reduce_sum(valid), "rewards/desirable": tf.reduce_sum(
            rewards * label), "rewards/undesirable": tf.reduce_sum(rewards * (1.0 - label)),
                 "desirable": tf.reduce_sum(label * valid)}
        return tf.reduce_sum(loss * valid), None, stats

    def _means(self, stats, rows):
        good = stats["desirable"]
        return {"kl": stats["kl"] / rows,
                "rewards/desirable": stats["rewards/desirable"] / tf.maximum(good, 1.0),
                "rewards/undesirable": stats["rewards/undesirable"]
                / tf.maximum(rows - good, 1.0)}

    def step_metrics(self, model, stats, denom, update):
        return self._means(stats, denom)

    def eval_metrics(self, sums):
        rows = max(sums["weight"], 1.0)
        means = self._means({k: tf.constant(sums[k]) for k in STATS}, tf.constant(rows))
        return {"loss": sums["loss_sum"] / rows, **{k: float(v) for k, v in means.items()}}

    def log_metrics(self, model, out):
        return {k: float(out[k]) for k in STATS[:3]}
