"""Reinforcement learning with verifiable rewards (`--train.stage=grpo`): GRPO.

Group Relative Policy Optimization (DeepSeekMath, DeepSeek-R1) as an objective of the
one Runner (train/objectives.py, train/loop.py): the same step, precision, strategies,
NaN recovery, checkpoints and logging as every stage. No value model.

Rollouts (`before_step`, every `--grpo.inner_steps` steps): the next batch_size x
grad_accum_steps prompts, each rendered with the run's chat profile
(generate/text.py `chat_profile`: the template and its stops, as generate and evaluate
use), are sampled `--grpo.group_size` times by the KV-cache `Generator` of the current
policy (`--grpo.temperature`, `--grpo.top_p`, at most `--grpo.max_new_tokens` tokens,
stop token included). The rewards (train/rewards.py) score each completion against the
record's reference; advantages are normalised within each group. With
`--grpo.dynamic_sampling=N` (DAPO's dynamic sampling) groups whose rewards all agree,
which carry no policy gradient, are set aside and up to N more batches of prompts are
drawn and sampled (seeds of attempt k > 0: a function of (seed, rollout, k)) until the
batch holds batch_size x grad_accum_steps groups whose rewards differ, in draw order;
set-aside groups fill any slots left. The batch's
log-probs under the sampling policy (pi_old) and the reference are scored once, by
`scoring.score_tokens`, and the batch is written into a buffer of variables that the
next `inner_steps` optimizer steps read.

Loss, per completion token t of completion i (ratio r = pi / pi_old, A_i its advantage,
d = log pi_ref - log pi):
  -min(r A_i, clip(r, 1 - eps, 1 + eps) A_i) + kl_coef (exp(d) - d - 1)
with the k3 KL estimator (unbiased, positive; DeepSeekMath eq. 4). pi, pi_old and
pi_ref are all scored at the sampling temperature, softmax(logits / --grpo.temperature),
the distribution the samples were drawn from (as TRL's GRPOTrainer does; top-p is not
taken into account there either). Token-level
averaging: the sum over every completion token of the step divided by their number
(all prompts, all micro-batches), as DAPO and TRL's "dapo" loss do. At the first
inner step r = 1 (pi_old is the current policy, scored in the same mode).

Reference (`--grpo.kl_coef` > 0; needs `--train.init_from`): with LoRA (dropout 0) the
policy's own base, adapters switched off (`lora.adapters_off`: no second copy);
otherwise a frozen copy of the init_from weights (`dpo.reference_model`). Policy, old
policy and reference score in one mode: no dropout, MoE layers dropless (as DPO), so
pi_old == pi at the first inner step and policy == reference gives KL 0.

Data (`--data.inputs`, JSON Lines or a JSON array): alpaca `instruction` (+ `input`)
and `output` as the reference, or `prompt` and `reference` / `answer`; a seeded
`--data.val_size` share is held out. Evaluation generates greedily for every held-out
prompt: eval "loss" = -mean reward (best checkpoint, early stopping), plus each reward
part.

Reproducibility: rollout seeds are a function of (--train.seed, rollout number, row),
the prompt order a checkpointed tf.data iterator, and the buffer (with its rollout's
log figures) is in the checkpoint: a resumed run samples exactly what the uninterrupted
one did. A NaN rollback (train/recovery.py) restores the buffer's batch with the
weights (`rollback_objects`) but not the prompt order: the steps after the restored one
train on the batch they had, the prompts of the skipped steps stay skipped. One replica
only.

Logged per step: loss, kl (mean k3 per token), clip_fraction (tokens whose ratio was
clipped), and of the latest rollout: reward (mean), reward_std, zero_variance_groups
(share of groups whose rewards are all equal), rewards/<part> means, rollout_seconds
(sampling, rewards and scoring; the step's own time is not in it), sample_seconds
(sampling alone), sample_tokens (generated), sample_tokens_per_sec (their ratio) and
sampled_batches (batches of prompts drawn: 1 without dynamic sampling); with dynamic
sampling also sampled_zero_variance_groups (the share of all drawn groups set aside).

Example:
    >>> exp = Experiment(..., train=TrainConfig(stage="grpo", init_from="runs/sft"))
    >>> result = train(exp, "runs/grpo")   # deepseek_tf.train.loop
"""

from __future__ import annotations

import json
import time

import numpy as np
import tensorflow as tf

from deepseek_tf.data.records import prompt_and_reference
from deepseek_tf.errors import UserError
from deepseek_tf.generate.decode import Generator
from deepseek_tf.generate.run import completion, pad_right
from deepseek_tf.generate.text import chat_profile, prompt_ids
from deepseek_tf.layers.moe import dropless_factor
from deepseek_tf.lora import adapters_off
from deepseek_tf.scoring import score_tokens
from deepseek_tf.train.dpo import freeze_mtp, init_from_records, reference_model
from deepseek_tf.train.objectives import Objective
from deepseek_tf.train.rewards import Rewards, advantages, reward_stats

#: Per-token sums of the step, logged as their means.
STATS = ("kl", "clip_fraction")


def grpo_token_loss(logp, old_logp, ref_logp, adv, clip_eps: float, kl_coef: float):
    """Per-token GRPO loss, k3 KL and clipped indicator, each (R, T) float32.

    Args:
      logp, old_logp, ref_logp: (R, T) log-probs of the completion tokens under the
        policy, the sampling policy and the reference.
      adv: (R,) advantages of the rows.
    """
    ratio = tf.exp(logp - old_logp)                                          # (R, T)
    a = adv[:, tf.newaxis]
    clipped = tf.clip_by_value(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = tf.minimum(ratio * a, clipped * a)
    d = ref_logp - logp
    kl = tf.exp(d) - d - 1.0
    was_clipped = tf.cast(tf.not_equal(ratio * a, surrogate), tf.float32)
    return -surrogate + kl_coef * kl, kl, was_clipped


def rollout_seeds(seed: int, rollout: int, rows: int, attempt: int = 0) -> np.ndarray:
    """int32 (rows,) sampling seeds of one rollout: a function of its number (and of the
    dynamic sampling attempt within it) alone."""
    entropy = [seed, rollout] + ([attempt] if attempt else [])
    state = np.random.SeedSequence(entropy).generate_state(rows, np.uint32)
    return (state % (2**31 - 1)).astype(np.int32)


BATCH = ("ids", "mask", "old", "ref", "adv")


class RolloutBuffer(tf.Module):
    """The sampled batch the train step reads (`next` gives its tensors), the log
    figures of its rollout (`stats`, JSON) and the prompt order; all checkpointed with
    the run (the Runner's data iterator)."""

    def __init__(self, prompt_iter, accum: int, rows: int, width: int):
        super().__init__(name="rollout")
        self.prompts = prompt_iter
        shape = (accum, rows, width)
        self.ids = tf.Variable(tf.zeros(shape, tf.int32), trainable=False)
        self.mask = tf.Variable(tf.zeros(shape), trainable=False)
        self.old = tf.Variable(tf.zeros(shape), trainable=False)
        self.ref = tf.Variable(tf.zeros(shape), trainable=False)
        self.adv = tf.Variable(tf.zeros(shape[:2]), trainable=False)
        self.stats = tf.Variable("{}", trainable=False)

    def batch_only(self) -> tf.Module:
        """The buffer without its prompt order (same checkpoint keys): what a NaN
        rollback restores, so the steps after it train on the batch the restored policy
        had while the prompts of the skipped steps stay skipped."""
        view = tf.Module(name="rollout_batch")
        for k in BATCH + ("stats",):
            setattr(view, k, getattr(self, k))
        return view

    def __iter__(self):
        return self

    def __next__(self):
        return {k: getattr(self, k).read_value() for k in BATCH}


class GRPOObjective(Objective):
    """`--train.stage=grpo`: see the module doc."""

    examples = "prompts"

    def prepare(self, exp, workdir, role, log):
        self.cfg, self.log = exp.grpo, log
        self.rewards = Rewards(exp.grpo)  # plug-ins imported: a bad name fails here
        self.tok, train_r, val_r = init_from_records(
            exp, workdir, "PROMPTS.jsonl (alpaca instruction/input with the reference "
            "answer as output)", "prompt", "GRPO evaluates rewards on held-out prompts")
        self.profile = chat_profile(exp, self.tok)
        room = exp.data.seq_len - exp.grpo.max_new_tokens
        self.train_set, self.val_set = (self._encode(r, room) for r in (train_r, val_r))
        log(f"GRPO prompts: {len(train_r)} train / {len(val_r)} validation, template "
            f"{exp.data.template}; rewards {exp.grpo.reward}")
        return exp

    def _encode(self, records, room: int) -> list[tuple]:
        """(prompt text, reference, prompt ids) of each record."""
        out = []
        for i, r in enumerate(records):
            prompt, ref = prompt_and_reference(r, i)
            ids = prompt_ids(prompt, self.tok, self.profile.template, r.get("system", ""))
            if len(ids) > room:
                raise UserError(f"the GRPO prompt {prompt[:40]!r} has {len(ids)} tokens, "
                                f"more than --data.seq_len - --grpo.max_new_tokens = {room}; "
                                f"raise --data.seq_len or drop the record.")
            out.append((prompt, ref, ids))
        return out

    def save_tokenizer(self, dst):
        self.tok.save(dst)

    def datasets(self, exp, workdir, ctx):
        if ctx.num_replicas_in_sync > 1 or ctx.num_input_pipelines > 1:
            raise UserError("--train.stage=grpo runs on one replica: use --train.strategy="
                            "default.")
        tcfg, n = exp.train, len(self.train_set)
        self.prompts_per_step = tcfg.batch_size * tcfg.grad_accum_steps
        order = (tf.data.Dataset.range(n).repeat()
                 .shuffle(n, seed=tcfg.seed, reshuffle_each_iteration=True)
                 .batch(self.prompts_per_step))
        self.buffer = RolloutBuffer(iter(order), tcfg.grad_accum_steps,
                                    tcfg.batch_size * exp.grpo.group_size, exp.data.seq_len)
        self.seq_len, self.seed = exp.data.seq_len, tcfg.seed
        return self.buffer, None

    def rollback_objects(self):
        return {"data": self.buffer.batch_only()}

    def build(self, model, exp, log):
        freeze_mtp(model)
        self.ref_model, self.lora_ref = None, False
        if exp.grpo.kl_coef == 0:
            log("reference: none (--grpo.kl_coef=0)")
        elif exp.train.finetuning_type == "lora" and exp.lora.dropout == 0:
            self.lora_ref = True
            log(f"reference model: the base weights of {exp.train.init_from}, the policy with "
                f"its LoRA adapters switched off")
        else:
            self.ref_model = reference_model(exp, log)

    # ------------------------------------------------------------- host side
    def _tf_fns(self, model, xla: bool):
        if hasattr(self, "_score"):
            return
        factor = dropless_factor(model.config, False)
        temp = self.cfg.temperature
        score = lambda m, ids, mask: score_tokens(m, ids, mask, False, factor,  # noqa: E731
                                                  temp)[0]
        self._score = tf.function(lambda ids, mask: score(model, ids, mask), autograph=False)
        ref = self.ref_model or model
        self._score_ref = tf.function(lambda ids, mask: score(ref, ids, mask), autograph=False)
        self.generator = Generator(model, self.seq_len, self.profile.stops, self.tok.pad_id,
                                   jit_compile=xla)

    def sample(self, model, items, seeds, temperature: float) -> list[dict]:
        """Completions (`generate.run.completion` dicts plus their `ids`) of prompt items
        (text, reference, ids), one per seed row, by the current policy."""
        ids, lengths = pad_right([it[2] for it in items], self.tok.pad_id)
        out, counts = self.generator.generate(
            ids, lengths, max_new_tokens=self.cfg.max_new_tokens, temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0, seed=seeds)
        results = []
        for row, n in zip(out.numpy(), counts.numpy()):
            c = completion(row, n, self.tok, self.profile.stops, self.profile.stop_strings)
            results.append({**c, "ids": row[:n]})
        return results

    def score(self, items, results):
        """(total (N,), parts) rewards of the completions of `items`."""
        return self.rewards([it[0] for it in items], [r["completion"] for r in results],
                            [it[1] for it in items], [r["num_tokens"] for r in results])

    def _draw(self, model, rollout: int, attempt: int) -> tuple[list[tuple], float, int]:
        """Groups (items, results, total, parts) of the next prompts, each sampled
        group_size times, and the seconds and tokens the generator took."""
        g = self.cfg.group_size
        chosen = next(self.buffer.prompts).numpy()
        items = [self.train_set[i] for i in chosen for _ in range(g)]
        seeds = rollout_seeds(self.seed, rollout, len(items), attempt)
        t0 = time.perf_counter()
        results = self.sample(model, items, seeds, self.cfg.temperature)
        seconds = time.perf_counter() - t0
        total, parts = self.score(items, results)
        groups = [(items[k:k + g], results[k:k + g], total[k:k + g],
                   {n: v[k:k + g] for n, v in parts.items()}) for k in range(0, len(items), g)]
        return groups, seconds, sum(r["num_tokens"] for r in results)

    def rollout(self, model, rollout: int) -> tuple[list[tuple], dict]:
        """The groups of one step's batch and their sampling figures. With
        `--grpo.dynamic_sampling=N` (DAPO), groups whose rewards all agree are set
        aside and up to N more batches of prompts are sampled until the batch is full
        of groups whose rewards differ; set-aside groups fill what is left."""
        want, kept, spare = self.prompts_per_step, [], []
        seconds = tokens = batches = 0
        for attempt in range(1 + self.cfg.dynamic_sampling):
            groups, s, n = self._draw(model, rollout, attempt)
            seconds, tokens, batches = seconds + s, tokens + n, batches + 1
            for grp in groups:
                varied = not self.cfg.dynamic_sampling or np.ptp(grp[2]) > 0
                (kept if varied else spare).append(grp)
            if len(kept) >= want:
                break
        sampled_zero = len(spare) / (batches * want) if self.cfg.dynamic_sampling else None
        stats = {"sample_seconds": seconds, "sample_tokens": tokens,
                 "sample_tokens_per_sec": tokens / max(seconds, 1e-9),
                 "sampled_batches": batches}
        if sampled_zero is not None:
            stats["sampled_zero_variance_groups"] = sampled_zero
        return (kept + spare)[:want], stats

    def before_step(self, state, step):
        if step % self.cfg.inner_steps:
            return  # the buffer (restored with the checkpoint on resume) holds the batch
        model, g = state.model, self.cfg.group_size
        self._tf_fns(model, state.exp.train.xla)
        t0 = time.perf_counter()
        groups, sampling = self.rollout(model, step // self.cfg.inner_steps)
        items = [it for grp in groups for it in grp[0]]
        results = [r for grp in groups for r in grp[1]]
        total = np.concatenate([grp[2] for grp in groups])
        parts = {k: np.concatenate([grp[3][k] for grp in groups]) for k in groups[0][3]}
        adv = advantages(total, g)
        n, t = len(items), self.seq_len
        ids = np.full((n, t), self.tok.pad_id, np.int32)
        mask = np.zeros((n, t), np.float32)
        for k, (it, r) in enumerate(zip(items, results)):
            p, c = len(it[2]), len(r["ids"])
            ids[k, :p], ids[k, p:p + c], mask[k, p:p + c] = it[2], r["ids"], 1.0
        ids_t, mask_t = tf.constant(ids), tf.constant(mask)
        old = self._score(ids_t, mask_t)
        if self.lora_ref:
            with adapters_off(model):
                ref = self._score_ref(ids_t, mask_t)
        else:
            ref = self._score_ref(ids_t, mask_t) if self.ref_model is not None else old
        for key, value in (("ids", ids_t), ("mask", mask_t), ("old", old), ("ref", ref),
                           ("adv", adv)):  # (A * rows, ...) -> (A, rows, ...)
            var = getattr(self.buffer, key)
            var.assign(tf.reshape(value, var.shape))
        self.buffer.stats.assign(json.dumps({
            **reward_stats(total, parts, g), "rollout_seconds": time.perf_counter() - t0,
            **sampling}))

    # ------------------------------------------------------------- the step
    def weight(self, batch):
        return tf.reduce_sum(batch["mask"])                               # completion tokens

    def forward(self, model, batch, training, seed=None, xla=False):
        mask = batch["mask"]
        logp, _ = score_tokens(model, batch["ids"], mask, training=False,
                               moe_capacity_factor=dropless_factor(model.config, xla),
                               temperature=self.cfg.temperature)
        loss, kl, clipped = grpo_token_loss(logp, batch["old"], batch["ref"], batch["adv"],
                                            self.cfg.clip_eps, self.cfg.kl_coef)
        stats = {"kl": tf.reduce_sum(kl * mask), "clip_fraction": tf.reduce_sum(clipped * mask)}
        return tf.reduce_sum(loss * mask), None, stats

    def step_metrics(self, model, stats, denom, update):
        return {k: stats[k] / denom for k in STATS}

    def log_metrics(self, model, out):
        return {**{k: float(out[k]) for k in STATS}, **self.rollout_stats()}

    def rollout_stats(self) -> dict:
        """The log figures of the buffer's rollout (restored with it on resume)."""
        return json.loads(self.buffer.stats.numpy().decode())

    def tokens_per_step(self, exp, replicas):
        return exp.train.global_batch(replicas) * exp.grpo.group_size * exp.data.seq_len

    # ------------------------------------------------------------- evaluation
    def heldout_rewards(self, state) -> tuple[np.ndarray, dict]:
        """(total (N,), {part: (N,)}) rewards of greedy completions of the held-out
        prompts by the current policy."""
        self._tf_fns(state.model, state.exp.train.xla)
        totals, parts, batch = [], {}, self.buffer.ids.shape[1]
        for lo in range(0, len(self.val_set), batch):
            items = self.val_set[lo:lo + batch]
            results = self.sample(state.model, items, np.zeros(len(items), np.int32), 0.0)
            total, part = self.score(items, results)
            totals.append(total)
            for k, v in part.items():
                parts.setdefault(k, []).append(v)
        return np.concatenate(totals), {k: np.concatenate(v) for k, v in parts.items()}

    def evaluate(self, state, eval_step):
        """Greedy completions of every held-out prompt, scored by the rewards."""
        total, parts = self.heldout_rewards(state)
        reward = float(np.mean(total))
        return {"loss": -reward, "reward": reward,
                **{f"rewards/{k}": float(np.mean(v)) for k, v in parts.items()}}
