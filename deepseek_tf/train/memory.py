"""Memory per worker: an estimate printed at the start of training, the budget check
(`--train.memory_budget`), and the measured peak RSS after the first step.

The estimate (`estimate`) counts, for one worker:
- parameters: every weight of the model (the analytic count of `deepseek_tf.params`,
  MTP modules included) in `--model.weight_dtype`; mixed precision keeps float32 master
  weights, so it changes nothing here. With `--model.expert_parallel=W` a worker holds
  1/W of the routed experts (W divides the worker count: the workers holding the same
  experts are replicas of them; their gradients are summed in place).
- gradients: 4 bytes per trainable weight (float32, as the weights; LoRA / freeze: only
  the trainable ones); with `--train.shard_optimizer=zero2` a worker keeps 1/W of the
  summed gradients (`sharding.summed_gradient_bytes`), with expert parallelism 1/W of
  the experts'.
- optimizer: AdamW's two float32 moments per trainable weight (8 bytes); zero1 / zero2:
  the worker's padded shard of ceil(N / W); expert parallelism: its experts' only.
- activations, a rough estimate of what the backward pass keeps, per replica
  micro-batch of n = batch_size x seq_len tokens, in the compute dtype (2 bytes under
  mixed precision, else 4):
    attention block:  a = 4 d + q_w + k_w + v_w + h v_d + 2 h T   (norm in/out, residual,
                      output; q, k, v; context; scores and probabilities per head)
    dense MLP block:  m = 3 d + 3 I
    MoE MLP block:    m = 3 d + 2 E + 3 f (k c + s) + 2 k c d    (router scores, expert
                      hidden of the k chosen and s shared experts, the capacity buffers;
                      c = capacity factor, 1 if dropless)
  summed over the L blocks (MTP modules included) as n (a + m) per block with
  `--train.remat=none`; with remat a block keeps only its input (n d) plus what remat
  does not cover, and one block's worth is recomputed at a time (block: L n d + the
  largest n (a + m); attention: L n (d + m) + the largest n a; mlp: L n (d + a) + the
  largest n m); plus the float32 logits and their gradient, 2 x 4 n V per output head.
  Temporaries of the framework (casts, fused kernels, XLA buffers) are not counted: the
  peak RSS after the first step (`peak_rss_bytes`, Linux `ru_maxrss`) shows the truth,
  TensorFlow's own ~0.5-1 GiB included.

Example:
    >>> est = estimate(Experiment(), workers=2)
    >>> print(est.describe())
"""

from __future__ import annotations

import dataclasses
import math
import resource

from deepseek_tf.config import Experiment
from deepseek_tf.config.train import parse_bytes
from deepseek_tf.errors import UserError
from deepseek_tf.params import count_parameters, routed_expert_params, router_state_params
from deepseek_tf.train.autotune import resolve_precision
from deepseek_tf.train.expert_parallel import local_weights
from deepseek_tf.train.sharding import summed_gradient_bytes

PARTS = ("parameters", "gradients", "optimizer", "activations")


def format_bytes(n: float) -> str:
    """`n` bytes as "12.34 MiB" or "1.23 GiB"."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """One worker's estimated bytes (see the module docstring) and what they assume."""
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    workers: int
    notes: dict  # part -> what it assumes, for `describe`

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def record(self) -> dict:
        """The bytes of each part and the total (log.jsonl's "memory" record)."""
        return {**{p: getattr(self, p) for p in PARTS}, "total": self.total}

    def describe(self) -> str:
        """The block printed at the start of training."""
        alike = f", alike on each of {self.workers} workers" if self.workers > 1 else ""
        lines = [f"memory per worker (estimate{alike}):"]
        for part in PARTS:
            lines.append(f"  {part:<12} {format_bytes(getattr(self, part)):>12}  "
                         f"{self.notes[part]}")
        lines.append(f"  {'total':<12} {format_bytes(self.total):>12}")
        return "\n".join(lines)


def _activation_bytes(exp: Experiment) -> tuple[int, str]:
    c, t = exp.model, exp.data.seq_len
    n, d = exp.train.batch_size * t, c.hidden_size
    mixed = exp.train.precision.startswith("mixed") or c.weight_dtype == "bfloat16"
    size = 2 if mixed else 4
    h = c.num_attention_heads
    if c.uses_mla:
        qk, vd = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        qkv = h * (2 * qk + vd)
    else:
        vd = c.resolved_head_dim
        qkv = (h + 2 * c.resolved_kv_heads) * vd
    attn = 4 * d + qkv + h * vd + 2 * h * t
    blocks = []
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        if c.is_moe_layer(i):
            cap = c.capacity_factor if c.capacity_factor > 0 else 1.0
            k, f = c.num_experts_per_tok, c.moe_intermediate_size
            mlp = 3 * d + 2 * c.n_routed_experts + 3 * f * (k * cap + c.n_shared_experts) \
                + 2 * k * cap * d
        else:
            mlp = 3 * d + 3 * c.intermediate_size
        blocks.append((attn, mlp))
    remat = exp.train.remat
    if remat == "none":
        kept = sum(a + m for a, m in blocks)
    elif remat == "block":
        kept = len(blocks) * d + max(a + m for a, m in blocks)
    elif remat == "attention":
        kept = sum(d + m for _, m in blocks) + max(a for a, _ in blocks)
    else:  # mlp
        kept = sum(d + a for a, _ in blocks) + max(m for _, m in blocks)
    logits = 2 * 4 * c.vocab_size * (1 + c.num_nextn_predict_layers)
    dtype = "float16" if exp.train.precision == "mixed_float16" else (
        "bfloat16" if mixed else "float32")
    note = (f"rough: {exp.train.batch_size} x {t} tokens per micro-batch, {len(blocks)} "
            f"blocks, remat {remat}, {dtype} activations, float32 logits")
    return int(n * (kept * size + logits)), note


def estimate(exp: Experiment, workers: int = 1,
             trainable: tuple[int, int] | None = None) -> MemoryEstimate:
    """One worker's memory for `exp` on `workers` MultiWorkerMirroredStrategy workers.

    Args:
      exp: the experiment (its precision resolved, or "auto" read as float32 here).
      workers: the run's worker count (ZeRO shards over them; 1 = no sharding).
      trainable: (trainable weights outside the routed experts, trainable routed-expert
        weights) of the whole model, from the built model where LoRA / freeze decide it;
        None = every weight but the routers' non-trainable state (full training).
    """
    c, tcfg = exp.model, exp.train
    counts = count_parameters(c)
    layers = range(c.num_hidden_layers + c.num_nextn_predict_layers)
    total = counts["total"] + counts["mtp_total"]
    routed = sum(routed_expert_params(c, i) for i in layers)
    if trainable is None:
        frozen = sum(router_state_params(c, i) for i in layers)
        trainable = (total - routed - frozen, routed)
    dense_tr, routed_tr = trainable
    if tcfg.finetuning_type == "lora":  # the adapters are weights of their own
        total += dense_tr + routed_tr
    ep = c.expert_parallel
    if ep == 1:  # the experts are mirrored like every other weight (and ZeRO shards them)
        dense_tr, routed_tr = dense_tr + routed_tr, 0
    shard = tcfg.shard_optimizer if workers > 1 else "none"
    wsize = 2 if c.weight_dtype == "bfloat16" else 4
    parameters = wsize * (total - routed + routed // ep)
    gradients = summed_gradient_bytes(dense_tr, workers, shard) + 4 * routed_tr // ep
    moments = math.ceil(dense_tr / workers) if shard != "none" else dense_tr
    optimizer = 8 * (moments + routed_tr // ep)
    activations, act_note = _activation_bytes(exp)
    split = f"; routed experts 1/{ep}" if ep > 1 and routed else ""
    notes = {
        "parameters": f"{total:,} weights, {c.weight_dtype}{split}",
        "gradients": f"float32, {dense_tr + routed_tr:,} trainable weights"
                     + (f"; zero2: 1/{workers} of the summed gradients" if shard == "zero2"
                        else "") + split,
        "optimizer": "AdamW m and v, float32"
                     + (f"; {shard}: 1/{workers} of them" if shard != "none" else "") + split,
        "activations": act_note}
    return MemoryEstimate(parameters, gradients, optimizer, activations, workers, notes)


def _run_on(ways: int, workers: int) -> int:
    """The worker count a suggestion names: this run's if `ways` divides it, else `ways`
    (expert parallelism and ZeRO need W | workers)."""
    return workers if workers >= ways and workers % ways == 0 else ways


def _alternatives(exp: Experiment, workers: int):
    """(flags, estimate) of settings that lower the estimate, each one change alone."""
    c, tcfg = exp.model, exp.train

    def swap(model=None, train=None):
        return dataclasses.replace(exp, model=c.replace(**(model or {})),
                                   train=tcfg.replace(**(train or {})))

    out = []
    if c.n_routed_experts and c.expert_parallel == 1 and tcfg.shard_optimizer == "none":
        for w in (2, 4, 8, 16):
            if c.n_routed_experts % w == 0:
                n = _run_on(w, workers)
                out.append((f"--model.expert_parallel={w} on {n} workers",
                            estimate(swap(model={"expert_parallel": w}), n)))
    if tcfg.shard_optimizer != "zero2":  # with expert parallelism: a multiple of W workers
        w = _run_on(c.expert_parallel, max(workers, 2))
        out.append((f"--train.shard_optimizer=zero2 on {w} workers",
                    estimate(swap(train={"shard_optimizer": "zero2"}), w)))
    if tcfg.remat != "block":
        out.append(("--train.remat=block", estimate(swap(train={"remat": "block"}), workers)))
    b = tcfg.batch_size // 2
    while b >= 1:
        accum = tcfg.grad_accum_steps * tcfg.batch_size // b
        out.append((f"--train.batch_size={b} --train.grad_accum_steps={accum} (same global "
                    f"batch)" if tcfg.batch_size % b == 0 else f"--train.batch_size={b}",
                    estimate(swap(train={"batch_size": b}), workers)))
        b //= 2
    return out


def _together(exp: Experiment, workers: int):
    """(flags, estimate) of the largest split `_alternatives` tries (expert parallelism
    for a MoE, and zero2), remat of every block and a batch of 1, at once."""
    c, tcfg = exp.model, exp.train
    model, train = {}, {"remat": "block", "batch_size": 1,
                        "grad_accum_steps": tcfg.grad_accum_steps * tcfg.batch_size,
                        "shard_optimizer": "zero2"}
    ways = [w for w in (2, 4, 8, 16) if c.n_routed_experts and c.n_routed_experts % w == 0]
    if c.expert_parallel > 1:
        w = _run_on(c.expert_parallel, workers)
    elif ways:
        model["expert_parallel"] = ways[-1]
        w = _run_on(ways[-1], workers)
    else:
        w = max(workers, 2)
    flags = " ".join(f"--{sec}.{k}={v}" for sec, d in (("model", model), ("train", train))
                     for k, v in d.items())
    return (f"{flags} on {w} workers",
            estimate(dataclasses.replace(exp, model=c.replace(**model),
                                         train=tcfg.replace(**train)), w))


def check_budget(exp: Experiment, workers: int, trainable=None) -> MemoryEstimate:
    """The estimate of one worker (`estimate`); raises UserError, in one line that says
    what would fit, if it exceeds `--train.memory_budget`."""
    est = estimate(exp, workers, trainable)
    budget_text = exp.train.memory_budget
    if not budget_text:
        return est
    budget = parse_bytes(budget_text)
    if est.total <= budget:
        return est
    parts = ", ".join(f"{p} {format_bytes(getattr(est, p))}" for p in PARTS)
    fits = []
    for flags, alt in _alternatives(exp, workers) if trainable is None else []:
        if alt.total <= budget and not any(f.split("=")[0] == flags.split("=")[0]
                                           for f, _ in fits):
            fits.append((flags, alt))
    if fits:
        what = "; what would fit: " + "; ".join(f"{f} ({format_bytes(a.total)})"
                                                for f, a in fits)
    else:
        flags, alt = _together(exp, workers)
        what = (f"; no single change fits; together: {flags} ({format_bytes(alt.total)})"
                if alt.total <= budget else
                f"; not even {flags} ({format_bytes(alt.total)}) fits: use a smaller model "
                f"or more workers")
    raise UserError(f"--train.memory_budget={budget_text}: one worker needs an estimated "
                    f"{format_bytes(est.total)} ({parts}), more than the budget of "
                    f"{format_bytes(budget)}{what}.")


def _all_train(exp: Experiment) -> bool:
    """True if every weight but the routers' state trains (counted analytically)."""
    return exp.train.finetuning_type == "full" and exp.train.dsa_stage != "dense_warmup"


def check_before_start(exp: Experiment, workers: int) -> None:
    """`check_budget` before the run writes anything (config.json included, so that the
    suggested flags can be used in the same workdir), where the estimate needs no built
    model: full training, with precision "auto" as this machine resolves it. The trainer
    checks again once the model is built (LoRA and freeze need it)."""
    if exp.train.memory_budget and _all_train(exp):
        precision, _ = resolve_precision(exp.train.precision)
        check_budget(dataclasses.replace(exp, train=exp.train.replace(precision=precision)),
                     workers)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainable_counts(model, exp: Experiment) -> tuple[int, int] | None:
    """(trainable weights outside the routed experts, trainable routed-expert weights) of
    the whole model where LoRA, freeze or the DSA warm-up chose them (None: full
    training, which `estimate` counts analytically)."""
    if _all_train(exp):
        return None
    variables = model.trainable_variables
    own = local_weights(variables) if exp.model.expert_parallel > 1 else []
    routed = sum(v.shape.num_elements() for v in own) * exp.model.expert_parallel
    return sum(v.shape.num_elements() for v in variables) - routed // \
        exp.model.expert_parallel, routed


def log_estimate(logger, step: int, est: MemoryEstimate) -> int:
    """The estimate's block on the chief's stdout and its bytes in log.jsonl ("memory");
    returns this process's peak RSS so far (model built, before the first step)."""
    rss = peak_rss_bytes()
    logger.write_event(step, "memory", {**est.record(), "peak_rss": rss}, est.describe())
    return rss


def log_peak_rss(logger, step: int, est: MemoryEstimate, before: int, log,
                 is_chief: bool) -> None:
    """After a step: this worker's peak RSS, and how much the step added to what it was
    before (`before`), next to the estimate (every worker prints its own; the chief's
    goes to log.jsonl too)."""
    rss = peak_rss_bytes()
    line = (f"memory after step {step}: peak RSS {format_bytes(rss)}, "
            f"{format_bytes(rss - before)} more than before the first step (measured) vs "
            f"estimate {format_bytes(est.total)}")
    if is_chief:
        logger.write_event(step, "memory", {"peak_rss": rss, "estimate": est.total}, line)
    else:
        log(line)
