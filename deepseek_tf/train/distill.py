"""Logit distillation (`--train.stage=distill`): a student learns a frozen teacher's
next-token distributions on the run's data.

An objective of the one Runner (train/objectives.py, train/loop.py), built on the token
objective of pretrain / sft: the same prepared data, loss mask, MoE / MTP aux terms of
the student, step, precision, accumulation, strategies, NaN recovery, checkpoints and
logging. The student is this run's model (any fine-tuning method: full, freeze, LoRA;
`--train.init_from` as usual).

Teacher (`--distill.teacher=WORKDIR`): the latest checkpoint of any deepseek_tf workdir
(trained or converted; any family: MLA / MoE / DSA / V4 teacher, dense or smaller
student), which must use the student's tokenizer (same fingerprint; a mismatch is
refused before anything is built). It is co-run: built beside the student under the
same strategy and precision, frozen (no gradient, not in the optimizer nor the
checkpoint), called in inference mode (no dropout; MoE layers dropless, with static
buffers under XLA) on the same micro-batch inside the same step. Teachers too big to
co-run (logits precomputed to disk) are not supported.

Loss per loss-mask token, with p = softmax(z_teacher / T) and q = softmax(z_student / T)
over the tokenizer's ids (padded vocabulary rows left out), T = `--distill.temperature`:
  forward_kl  KL(p || q) = sum p (log p - log q)   (mass-covering; Hinton et al. 2015)
  reverse_kl  KL(q || p) = sum q (log q - log p)   (mode-seeking; MiniLLM, Gu et al. 2024)
  mix         w KL(p || q) + (1 - w) KL(q || p), w = `--distill.mix_weight`
  loss        alpha T^2 D + (1 - alpha) CE(student, next token), alpha = `--distill.alpha`
(T^2 keeps the gradient scale of the soft targets independent of T). The step divides
the sums by the global number of loss tokens, as for pretrain / sft.

Logged per step and evaluation: loss (the total above), lm_loss (the cross-entropy;
eval: its perplexity), kl (D of `--distill.loss` at T, without T^2), kl_forward and
kl_reverse (both at T), accuracy. The eval loss (best checkpoint, early stopping) is the
total.

Example:
    >>> exp = Experiment(..., train=TrainConfig(stage="distill"),
    ...                  distill=DistillConfig(teacher="runs/big", temperature=2.0))
    >>> result = train(exp, "runs/student")   # deepseek_tf.train.loop
"""

from __future__ import annotations

import os

import tensorflow as tf

from deepseek_tf.config import DistillConfig
from deepseek_tf.data.tokenizer import load_tokenizer
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.layers.moe import dropless_factor
from deepseek_tf.model import count_params
from deepseek_tf.train import aux_losses
from deepseek_tf.train.objectives import TokenObjective, batch_logits, masked_token_loss
from deepseek_tf.workdir_files import CHECKPOINT_DIR

#: The per-token sums of the step and the evaluation, logged as their means.
KL_STATS = ("kl_forward", "kl_reverse")


def kl_divergences(student_logits, teacher_logits, temperature: float) -> tuple:
    """(KL(p || q), KL(q || p)) per position, each (..., ) float32, of p = softmax of the
    teacher's and q = softmax of the student's logits (..., V) divided by `temperature`."""
    log_q = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature, -1)
    log_p = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature, -1)
    diff = log_p - log_q                                                  # (..., V)
    return (tf.reduce_sum(tf.exp(log_p) * diff, -1),
            tf.reduce_sum(tf.exp(log_q) * -diff, -1))


def divergence(forward, reverse, cfg: DistillConfig):
    """D of `cfg.loss` (forward_kl, reverse_kl or their mix) from both KLs (any shape)."""
    w = {"forward_kl": 1.0, "reverse_kl": 0.0}.get(cfg.loss, cfg.mix_weight)
    return w * forward + (1.0 - w) * reverse


def distill_loss(forward, reverse, ce, cfg: DistillConfig):
    """alpha T^2 D + (1 - alpha) CE, element-wise (per token or summed over tokens)."""
    t2 = cfg.temperature * cfg.temperature
    return cfg.alpha * t2 * divergence(forward, reverse, cfg) + (1.0 - cfg.alpha) * ce


def teacher_experiment(teacher: str):
    """The teacher workdir's Experiment; one-line errors for a directory that is not a
    workdir or holds no checkpoint."""
    from deepseek_tf.workdir import load_experiment

    t_exp = load_experiment(teacher)
    if not tf.train.latest_checkpoint(os.path.join(teacher, CHECKPOINT_DIR)):
        raise UserError(f"--distill.teacher={teacher}: checkpoints/ holds no checkpoint; "
                        f"train or convert the teacher first.")
    return t_exp


def check_teacher(teacher: str, t_exp, tok, seq_len: int) -> None:
    """One-line errors for a teacher (workdir `teacher`, Experiment `t_exp`) with another
    tokenizer than the student's `tok` or too short a context for `seq_len`."""
    from deepseek_tf.workdir import load_run_tokenizer

    t_tok = load_run_tokenizer(teacher, t_exp)
    if t_tok.fingerprint != tok.fingerprint:
        raise ConfigError(
            f"--distill.teacher={teacher} uses another tokenizer ({t_tok.name}, "
            f"{t_tok.vocab_size} ids) than the student's data ({tok.name}, {tok.vocab_size} "
            f"ids): logits only compare over the same ids; prepare the student's data with "
            f"the teacher's tokenizer (its --tokenizer.* settings), or pick a teacher that "
            f"uses this one.")
    if t_exp.model.max_position_embeddings < seq_len:
        raise ConfigError(f"--data.seq_len={seq_len} exceeds the teacher's "
                          f"max_position_embeddings={t_exp.model.max_position_embeddings}; "
                          f"lower --data.seq_len.")


class DistillObjective(TokenObjective):
    """`--train.stage=distill`: see the module doc."""

    def prepare(self, exp, workdir, role, log):
        self.cfg = exp.distill
        t_exp = teacher_experiment(self.cfg.teacher)  # before any data is prepared
        exp = super().prepare(exp, workdir, role, log)
        tok = load_tokenizer(self.data_dir)
        self.vocab = tok.vocab_size  # the ids both models share
        check_teacher(self.cfg.teacher, t_exp, tok, exp.data.seq_len)
        self.teacher_family = t_exp.model.attention_type + (
            f", {t_exp.model.n_routed_experts} experts" if t_exp.model.n_routed_experts else "")
        return exp

    def build(self, model, exp, log):
        from deepseek_tf.workdir import load_workdir

        self.teacher, _ = load_workdir(self.cfg.teacher)  # this strategy's, this precision
        self.teacher.trainable = False
        _, total = count_params(self.teacher)
        cfg = self.cfg
        log(f"teacher: the frozen weights of {cfg.teacher} ({self.teacher_family}; "
            f"{total:,} params), co-run in inference mode in every step; loss {cfg.loss}, "
            f"temperature {cfg.temperature:g}, alpha {cfg.alpha:g}")

    def forward(self, model, batch, training, seed=None, xla=False):
        with_aux = training and aux_losses.uses_aux(model.config)
        out = batch_logits(model, batch, training, with_aux, seed)
        logits = out[0] if with_aux else out                              # (B, T, V)
        ce, hits = masked_token_loss(logits, batch)
        teacher = tf.stop_gradient(batch_logits(
            self.teacher, batch, False,
            moe_capacity_factor=dropless_factor(self.teacher.config, xla)))  # (B, T, V')
        v = self.vocab
        fwd, rev = kl_divergences(logits[..., :v], teacher[..., :v], self.cfg.temperature)
        mask = batch["loss_mask"]
        stats = {"hits": hits, "ce": ce, "kl_forward": tf.reduce_sum(fwd * mask),
                 "kl_reverse": tf.reduce_sum(rev * mask)}
        loss = distill_loss(stats["kl_forward"], stats["kl_reverse"], ce, self.cfg)
        if not with_aux:
            return loss, None, stats
        extra, aux_stats = aux_losses.aux_terms(model.config, out[1], batch)
        return loss, extra, {**stats, **aux_stats}

    def _kl_metrics(self, stats, denom) -> dict:
        kls = {k: stats[k] / denom for k in KL_STATS}
        return {"lm_loss": stats["ce"] / denom, **kls,
                "kl": divergence(kls["kl_forward"], kls["kl_reverse"], self.cfg)}

    def step_metrics(self, model, stats, denom, update):
        return {**super().step_metrics(model, stats, denom, update),
                **self._kl_metrics(stats, denom)}

    def eval_metrics(self, sums):
        lm = super().eval_metrics({**sums, "loss_sum": sums["ce"]})  # perplexity of the CE
        return {**lm, **self._kl_metrics(sums, max(sums["weight"], 1.0)),
                "loss": sums["loss_sum"] / max(sums["weight"], 1.0)}

    def log_metrics(self, model, out):
        return {**super().log_metrics(model, out),
                **{k: float(out[k]) for k in ("lm_loss", "kl") + KL_STATS}}
