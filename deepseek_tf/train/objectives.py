"""Training objectives: what a stage adds to the one Runner (train/loop.py).

Every stage (`--train.stage`) trains through the same `Runner` and the same step
(train/step.py: micro-batch accumulation, all-reduce, global-norm skip decision,
clipping, fused AdamW, recovery, checkpoints, logging, best checkpoint). A stage
plugs in an `Objective`, which owns
  - its inputs: `prepare` (check / prepare the data, before any graph is built),
    `datasets` (this worker's train and validation pipelines; training batches carry a
    leading (A,) micro-batch axis), `save_tokenizer`;
  - its models: `build` (inside the strategy and precision scopes, after the
    fine-tuning method; e.g. a frozen reference or teacher model);
  - its loss: `forward(model, batch, training, seed) -> (loss_sum, extra_sum, stats)`
    on one micro-batch and `weight(batch)` (how many loss units it holds: tokens,
    pairs). The step divides both sums by the global weight (all replicas, all
    micro-batches), so accumulation and replicas give the large-batch step; `extra_sum`
    (or None) trains but is not logged as the loss; `stats` are sums accumulated over
    micro-batches and all-reduced, which `step_metrics` turns into metrics (and side
    effects such as the MoE router-bias update);
  - its evaluation: `evaluate(state, eval_step)`; by default the eval step all-reduces
    `loss_sum`, `weight` and `stats` per batch, `evaluate` sums `eval_batches` of them
    and `eval_metrics` makes the numbers (the "loss" drives the best checkpoint and
    early stopping); an objective may evaluate otherwise (GRPO: held-out rewards of
    greedy completions, loss = -reward);
  - on-policy batches: `before_step(state, step)` runs on the host before the Runner's
    step number `step` (0-based); an objective whose batches are sampled from the
    current policy fills the batch the step will read there (GRPO: its `datasets`
    iterator is a checkpointed buffer of variables it refills every `inner_steps`).
    No-op by default. `rollback_objects`: what a NaN rollback restores besides model,
    optimizer, step and RNG (GRPO: the buffer's batch, not its prompt position).

Stages: pretrain and sft (`TokenObjective`: next-token cross-entropy on the loss mask,
plus the MoE / MTP aux terms; "auto" picks sft for chat-format data, else pretrain),
dpo (train/dpo.py), kto (train/kto.py), grpo (train/grpo.py), distill (train/distill.py:
the token loss plus a KL to a frozen teacher co-run in the step).

Example:
    >>> objective = TokenObjective()
    >>> exp = objective.prepare(exp, workdir, role, log=print)   # stage "auto" resolved
    >>> train_ds, eval_ds = objective.datasets(exp, workdir, input_context)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.data import pipeline, shards
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import copy_tokenizer, load_tokenizer
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.model import token_losses
from deepseek_tf.scoring import perplexity_scorer
from deepseek_tf.train import aux_losses
from deepseek_tf.train import strategy as strategy_lib
from deepseek_tf.workdir_files import prepared_data_dir


class Objective:
    """The interface a stage implements (see the module doc); defaults shared by all."""

    examples = "sequences"  # what one batch row is, for the log

    def prepare(self, exp: Experiment, workdir: str, role, log) -> Experiment:
        """Checks (and prepares) the inputs; returns `exp` with the stage resolved."""
        raise NotImplementedError

    def save_tokenizer(self, dst: str) -> None:
        raise NotImplementedError

    def datasets(self, exp: Experiment, workdir: str, ctx) -> tuple:
        raise NotImplementedError

    def build(self, model, exp: Experiment, log) -> None:
        """Extra models or freezing, inside the strategy and precision scopes."""

    def guard(self, fn):
        """`fn` (a step) wrapped to report data errors; identity by default."""
        return fn

    def weight(self, batch: dict) -> tf.Tensor:
        raise NotImplementedError

    def forward(self, model, batch: dict, training: bool, seed=None, xla=False) -> tuple:
        """(loss sum, extra loss sum or None, stats) of one micro-batch; `xla`: traced
        for XLA (static shapes needed)."""
        raise NotImplementedError

    def step_metrics(self, model, stats: dict, denom, update) -> dict:
        raise NotImplementedError

    def before_step(self, state, step: int) -> None:
        """Host work before step `step` (0-based), e.g. sampling on-policy batches."""

    def rollback_objects(self) -> dict:
        """Trackables a NaN rollback (train/recovery.py) restores from the checkpoint
        with the model, beyond the data position it keeps (e.g. GRPO's sampled batch)."""
        return {}

    def eval_batches(self, exp: Experiment) -> int:
        """Batches (per replica) of one evaluation."""
        return exp.train.eval_steps

    def evaluate(self, state, eval_step) -> dict:
        """The metrics of one evaluation: `eval_metrics` of the sums of `eval_batches`
        validation batches through `eval_step`."""
        it = iter(state.eval_ds)
        sums: dict[str, float] = {}
        for _ in range(self.eval_batches(state.exp)):
            for k, v in eval_step(it).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.eval_metrics(sums)

    def eval_metrics(self, sums: dict) -> dict:
        raise NotImplementedError

    def log_metrics(self, model, out: dict) -> dict:
        """Host-side train log entries from the step's output."""
        return {}

    def tokens_per_step(self, exp: Experiment, replicas: int) -> int:
        return exp.train.global_batch(replicas) * exp.data.seq_len


# ----------------------------------------------------------------- token data
def data_dir_of(exp: Experiment, workdir: str) -> str:
    return prepared_data_dir(exp.data.data_dir, workdir)


def _wait_for_data(data_dir: str, timeout: float, log) -> None:
    """A non-chief worker waits for the chief to prepare the shared data directory."""
    log(f"waiting for the chief to prepare {data_dir}")
    deadline = time.time() + (timeout or float("inf"))
    while not os.path.exists(os.path.join(data_dir, shards.METADATA_FILE)):
        if time.time() > deadline:
            raise UserError(f"{data_dir} did not appear within {timeout:.0f}s: workers need a "
                            f"shared --workdir / --data.data_dir, or data prepared on every "
                            f"machine with python -m deepseek_tf.prepare.")
        time.sleep(1.0)


def check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} exists and is not a directory; choose another.")


def prepare_run(exp: Experiment, workdir: str, log=print,
                role: strategy_lib.Role = strategy_lib.Role()) -> dict:
    """Validates the workdir and the data (preparing it if absent); returns metadata.

    Raises ConfigError / UserError with one clear line; writes nothing into an
    existing workdir before everything checks out. Only the chief prepares data.
    """
    check_workdir(workdir)
    data_dir = data_dir_of(exp, workdir)
    if not role.is_chief and not os.path.exists(os.path.join(data_dir, shards.METADATA_FILE)):
        # The chief may be preparing it right now (the directory exists before its
        # metadata.json, which is written last).
        _wait_for_data(data_dir, exp.train.collective_timeout, log)
    if not os.path.exists(data_dir):
        source = exp.data.inputs or f"the '{exp.data.corpus}' corpus"
        log(f"data directory {data_dir} does not exist yet: preparing {source}")
        prepare(exp.data, data_dir, exp.tokenizer, log=log, scorer=perplexity_scorer(exp.data))
    meta = shards.read_metadata(data_dir)
    tok = load_tokenizer(data_dir)
    if tok.vocab_size > exp.model.vocab_size:
        raise ConfigError(f"the data's {tok.name} tokenizer has {tok.vocab_size} ids but "
                          f"--model.vocab_size={exp.model.vocab_size}; set "
                          f"--model.vocab_size >= {tok.vocab_size}.")
    if tok.fingerprint != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"{data_dir}: tokenizer files disagree with metadata.json; "
                        f"re-run prepare into a new directory.")
    return meta


def batch_logits(model, batch: dict, training: bool, with_aux: bool = False,
                 dropout_seed=None, **kwargs):
    """`model`'s output on one packed batch of (B, T) tensors: logits (B, T, V), or with
    `with_aux` (logits, aux); `kwargs` go to the model (e.g. `moe_capacity_factor`)."""
    return model(batch["inputs"], segment_ids=batch["segment_ids"],
                 positions=batch["positions"], training=training, return_aux=with_aux,
                 dropout_seed=dropout_seed, **kwargs)


def masked_token_loss(logits, batch: dict) -> tuple:
    """(CE loss sum, hits) of `logits` (B, T, V) against the batch's targets over its loss
    mask."""
    mask = batch["loss_mask"]
    loss_sum = tf.reduce_sum(token_losses(logits, batch["targets"]) * mask)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["targets"]),
                   tf.float32)
    return loss_sum, tf.reduce_sum(hits * mask)


def token_loss(model, batch: dict, training: bool, with_aux: bool = False,
               dropout_seed=None) -> tuple:
    """(CE loss sum, hits) over the loss mask or, `with_aux`, (CE loss sum, hits, extra
    loss sum, aux stats) of one batch of (B, T) tensors."""
    out = batch_logits(model, batch, training, with_aux, dropout_seed)
    if not with_aux:
        return masked_token_loss(out, batch)
    return masked_token_loss(out[0], batch) + aux_losses.aux_terms(model.config, out[1], batch)


class TokenObjective(Objective):
    """pretrain / sft: next-token cross-entropy on the loss mask of prepared shards, plus
    the MoE balance / z losses and the MTP loss (train/aux_losses.py), whose stats also
    drive the router-bias update. Metrics: loss, accuracy (eval: perplexity)."""

    def prepare(self, exp, workdir, role, log):
        self.meta = prepare_run(exp, workdir, log=log, role=role)
        self.data_dir = data_dir_of(exp, workdir)
        if exp.train.stage == "auto":  # the data says which: chat samples or plain text
            stage = "sft" if self.meta.get("kind") == "sft" else "pretrain"
            exp = dataclasses.replace(exp, train=exp.train.replace(stage=stage))
        return exp

    def save_tokenizer(self, dst):
        copy_tokenizer(self.data_dir, dst)

    def datasets(self, exp, workdir, ctx):
        tcfg = exp.train
        train_ds = pipeline.make_dataset(exp.data, self.data_dir, "train", tcfg.batch_size,
                                         seed=tcfg.seed, training=True,
                                         accum_steps=tcfg.grad_accum_steps, input_context=ctx,
                                         metadata=self.meta)
        eval_ds = pipeline.make_dataset(exp.data, self.data_dir, "validation", tcfg.batch_size,
                                        seed=tcfg.seed, training=False, input_context=ctx,
                                        metadata=self.meta)
        return train_ds, eval_ds

    def guard(self, fn):
        # A corrupt shard raises one error naming the file and offset, never skipped silently.
        return shards.guard_data_errors(fn, shards.all_shard_paths(self.data_dir, self.meta))

    def weight(self, batch):
        return tf.reduce_sum(batch["loss_mask"])

    def forward(self, model, batch, training, seed=None, xla=False):
        if not (training and aux_losses.uses_aux(model.config)):
            loss_sum, hits = token_loss(model, batch, training, dropout_seed=seed)
            return loss_sum, None, {"hits": hits}
        loss_sum, hits, extra, stats = token_loss(model, batch, training, True, seed)
        return loss_sum, extra, {"hits": hits, **stats}

    def step_metrics(self, model, stats, denom, update):
        return {"accuracy": stats["hits"] / denom, "loss_tokens": denom,
                **aux_losses.step_metrics(model, stats, denom, update)}

    def eval_metrics(self, sums):
        tokens = sums["weight"]
        loss = sums["loss_sum"] / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                "accuracy": sums["hits"] / max(tokens, 1.0), "tokens": tokens}

    def log_metrics(self, model, out):
        return {"accuracy": float(out["accuracy"]), **aux_losses.log_metrics(model, out)}
