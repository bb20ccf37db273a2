"""The training runner: set up, (resume,) train, evaluate, checkpoint, log, plot.

The split follows TF Model Garden's task/runner idea: the stage's objective
(train/objectives.py: pretrain / sft token loss, train/dpo.py, train/kto.py, train/grpo.py,
train/distill.py) checks everything a
user can get wrong before any graph is built and owns data, loss and metrics;
`build_state` makes model, optimizer and data under the strategy scope; `Runner`
runs the loop as `begin` / `run_step` (with its log / eval / checkpoint intervals) /
`end`, the same for every stage.

With several workers (train/strategy.py) every worker runs this same loop; only
the chief writes config.json, log.jsonl, summaries, loss.svg and the real
checkpoints (train/checkpoint.py). SIGTERM on any worker makes all of them save
and raise `Preempted` (train/preemption.py).

Example:
    >>> result = train(Experiment(), "/tmp/run")
    >>> result["eval"]["loss"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import threading
import time

import keras
import tensorflow as tf

from deepseek_tf import exit_codes
from deepseek_tf.config import Experiment
from deepseek_tf.layers.moe import expert_exchange
from deepseek_tf.lora import save_adapter
from deepseek_tf.model import DeepSeekCausalLM, count_params
from deepseek_tf.train import autotune
from deepseek_tf.train import checkpoint as ckpt_lib
from deepseek_tf.train import expert_parallel
from deepseek_tf.train import finetune
from deepseek_tf.train import memory
from deepseek_tf.train import precision
from deepseek_tf.train import sharding
from deepseek_tf.train import strategy as strategy_lib
from deepseek_tf.train.best import BestCheckpoint
from deepseek_tf.train.distill import DistillObjective
from deepseek_tf.train.dpo import DPOObjective
from deepseek_tf.train.grpo import GRPOObjective
from deepseek_tf.train.kto import KTOObjective
from deepseek_tf.train.logger import MetricLogger, plot_losses, truncate_log
from deepseek_tf.train.objectives import Objective, TokenObjective
from deepseek_tf.train.optimizer import make_optimizer, make_schedule
from deepseek_tf.train.preemption import PreemptionWatcher
from deepseek_tf.train.profile import StepProfiler
from deepseek_tf.train.recovery import Recovery
from deepseek_tf.train.step import make_eval_step, make_train_step
from deepseek_tf.workdir_files import CONFIG_FILE, TENSORBOARD_DIR, TOKENIZER_DIR


def make_objective(exp: Experiment) -> Objective:
    """The objective of `--train.stage` (auto, pretrain and sft: the token loss)."""
    stages = {"dpo": DPOObjective, "kto": KTOObjective, "grpo": GRPOObjective,
              "distill": DistillObjective}
    return stages.get(exp.train.stage, TokenObjective)()


@dataclasses.dataclass
class RunState:
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    rng: tf.random.Generator
    train_iter: object
    eval_ds: object
    role: strategy_lib.Role
    checkpoints: ckpt_lib.RunCheckpoints
    collectives: strategy_lib.Collectives
    exp: Experiment | None = None  # the experiment, with precision "auto" resolved
    objective: Objective | None = None
    #: jit_compile=auto's timed grad functions by XLA on/off, for the train step to reuse
    grad_fns: dict = dataclasses.field(default_factory=dict)
    #: ZeRO-1/2 (`--train.shard_optimizer`): this worker's share of the optimizer, or None
    sharded: sharding.ShardedAdamW | None = None
    #: `--model.expert_parallel`: this worker's experts and their AdamW, or None
    experts: expert_parallel.LocalAdamW | None = None
    #: one worker's estimated memory (train/memory.py)
    memory: memory.MemoryEstimate | None = None


def build_state(exp: Experiment, workdir: str, objective: Objective,
                role: strategy_lib.Role = strategy_lib.Role(), log=print) -> RunState:
    """Model (with `--train.init_from` weights, its fine-tuning method and the
    objective's models), optimizer, data iterators and checkpoints, built under the
    strategy (`--train.precision=auto` is resolved first: `state.exp`). `objective` has
    been prepared (`Objective.prepare`)."""
    if exp.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(exp.train.seed)
    strategy = strategy_lib.make_strategy(exp.train)
    collectives = strategy_lib.Collectives(strategy)
    if exp.train.precision == "auto":
        choice, why = autotune.resolve_precision("auto")
        chief = autotune.PRECISIONS[collectives.chief_value(autotune.PRECISIONS.index(choice))]
        if chief != choice:
            choice, why = chief, f"auto -> {chief}: the chief's choice (here: {why})"
        log(f"precision: {why}")
        exp = autotune.with_train(exp, precision=choice,
                                  auto_decisions=autotune.note(exp, precision=why))
    warning = autotune.precision_warning(exp.train.precision,
                                         autotune.gpu_compute_capabilities())
    if warning:
        log(warning)
    tcfg = exp.train
    ctx = strategy_lib.input_context(strategy, role)  # this worker's share of the data
    train_ds, eval_ds = objective.datasets(exp, workdir, ctx)

    ep = exp.model.expert_parallel
    exchange = expert_parallel.make_exchange(exp, strategy, role, collectives)
    with strategy.scope():
        with precision.policy_scope(tcfg.precision), expert_exchange(exchange):
            model = DeepSeekCausalLM(exp.model, remat=tcfg.remat, dsa_stage=tcfg.dsa_stage)
            finetune.prepare_model(model, exp, log, resuming=ckpt_lib.has_checkpoint(workdir))
            objective.build(model, exp, log)  # e.g. DPO's frozen reference
        # --train.memory_budget: refused here, before any optimizer state or checkpoint
        estimate = memory.check_budget(exp, role.num_workers,
                                       memory.trainable_counts(model, exp))
        own = expert_parallel.local_weights(model.trainable_variables) if ep > 1 else []
        mirrored = [v for v in model.trainable_variables if all(v is not o for o in own)]
        shard = sharding.resolve(tcfg.shard_optimizer, strategy, role.num_workers, exp.optim,
                                 mirrored, log)
        slots = shard == "none"  # else this worker's share is kept by ShardedAdamW
        optimizer = precision.wrap_optimizer(
            make_optimizer(exp.optim, exp.decay_steps, model, slots=slots, variables=mirrored),
            tcfg, mirrored if slots else [])
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        rng = tf.random.Generator.from_seed(tcfg.seed)
    sharded = None
    if not slots:  # outside the scope: plain variables, one shard per worker
        sharding.check_ranks(collectives.gather(role.index), shard)
        # the mirrored weights: expert parallelism's experts have a LocalAdamW of their own
        sharded = sharding.ShardedAdamW(optimizer, mirrored, strategy, shard,
                                        role.index, tcfg.collective_timeout)
        log(f"optimizer sharding: {sharded.describe()}")
    experts = expert_parallel.LocalAdamW(optimizer, own, exchange) if own else None
    if experts:
        log(experts.describe(ep))
    worker_objects = {"optimizer_shard": sharded.slots} if sharded else {}
    if experts:
        worker_objects["experts"] = experts.state
    train_iter = iter(train_ds)  # a plain tf.data iterator: checkpointable
    checkpoints = ckpt_lib.RunCheckpoints(
        workdir, {"model": model, "optimizer": optimizer, "step": step, "rng": rng},
        train_iter, role, tcfg.keep_checkpoints, barrier=collectives.barrier,
        worker_objects=worker_objects or None,
        shards=sharded.world if sharded else (role.num_workers if ep > 1 else 1))
    return RunState(strategy, model, optimizer, step, rng, train_iter, eval_ds, role,
                    checkpoints, collectives, exp, objective, sharded=sharded,
                    experts=experts, memory=estimate)


def weights_fingerprint(model: keras.Model, only=None) -> str:
    """sha256 (16 hex digits) of every model weight's bytes (or of those in `only`): equal
    iff bitwise equal."""
    h = hashlib.sha256()
    for v in model.weights if only is None else only:
        h.update(v.path.split("/", 1)[-1].encode())  # without the model's (instance) name
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(state: RunState, tcfg) -> str:
    role, strategy = state.role, state.strategy
    where = f"{role.name} of {role.num_workers} workers" + (" (chief)" if role.is_chief else "")
    name = ("MultiWorkerMirroredStrategy" if strategy_lib.is_multi_worker(strategy)
            else type(strategy).__name__.lstrip("_"))
    return (f"stage {tcfg.stage}; strategy: {name}, {strategy.num_replicas_in_sync} "
            f"replicas; this is {where}; precision {tcfg.precision}; XLA {tcfg.jit_compile}; "
            f"remat {tcfg.remat}")


def _token_objective(state: RunState):
    """The run's objective if the timing's random token batch fits it (then the timed
    grad function is the train step's own), else None (time the token loss)."""
    return state.objective if type(state.objective) is TokenObjective else None


def _resolve_jit(state: RunState, log) -> Experiment:
    """`state.exp` with `--train.jit_compile=auto` decided on this machine (and logged)."""
    exp = state.exp
    if exp.train.jit_compile != "auto":
        return exp
    if exp.model.expert_parallel > 1:
        why = "auto -> false: expert parallelism's all-to-alls run outside XLA"
        log(f"jit_compile: {why}")
        return autotune.with_train(exp, jit_compile="false",
                                   auto_decisions=autotune.note(exp, jit_compile=why))
    token_objective = _token_objective(state)
    with state.strategy.scope():
        choice, why = autotune.resolve_jit_compile(exp, state.model,
                                                   agree=state.collectives.chief_value, log=log,
                                                   strategy=state.strategy,
                                                   measure=state.role.is_chief,
                                                   objective=token_objective,
                                                   built=state.grad_fns if token_objective
                                                   else None)
    log(f"jit_compile: {why}")
    return autotune.with_train(exp, jit_compile=choice,
                               auto_decisions=autotune.note(exp, jit_compile=why))


def _preemption_watcher(state: RunState, log):
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers can only be installed from the main thread
    watcher = PreemptionWatcher(state.strategy, state.checkpoints.save)
    log(f"preemption: SIGTERM to any worker saves a checkpoint on every worker, then the "
        f"trainer exits with code {exit_codes.PREEMPTED}")
    return watcher


def train(exp: Experiment, workdir: str, log=print) -> dict:
    """Trains `exp` in `workdir`, resuming from its latest checkpoint if any.

    Returns {"step", "train": last train metrics, "eval": last eval metrics,
    "seconds": wall time of the loop, "skipped_steps", "weights_sha256"}. Raises
    `Preempted` after saving a checkpoint if any worker got SIGTERM.
    """
    with contextlib.ExitStack() as cleanup:  # SIGTERM handler, temporary dirs, writers
        # Last on the way out: free the run's objects now. Its tf.data iterators sit in
        # reference cycles (through the checkpoint), so only the garbage collector frees
        # them, at some later moment in whatever the program does next; there,
        # destroying an idle iterator has blocked a process for up to a minute (it waits
        # for tf.data's autotuning thread), in the middle of an unrelated call.
        cleanup.callback(gc.collect)
        return _train(exp, workdir, log, cleanup)


def _train(exp: Experiment, workdir: str, log, cleanup: contextlib.ExitStack) -> dict:
    runner = Runner.begin(exp, workdir, log, cleanup)
    while not runner.done:
        runner.run_step()
    return runner.end()


class Runner:
    """One training run split as TF Model Garden's runner does: `begin` (config,
    state, resume, steps, logging), `run_step` (one step with its log / eval /
    checkpoint / preemption intervals and bad-step recovery), `end` (fingerprint,
    adapter, plot, summary).

    Example:
        >>> runner = Runner.begin(exp, workdir, print, cleanup)
        >>> while not runner.done:
        ...     runner.run_step()
        >>> result = runner.end()
    """

    def __init__(self, exp: Experiment, workdir: str, state: RunState,
                 start: int, log, cleanup: contextlib.ExitStack):
        self.exp, self.tcfg, self.workdir, self.state, self.log = exp, exp.train, workdir, \
            state, log
        tcfg, role = self.tcfg, state.role
        self.step = start
        self.objective = objective = state.objective
        self.tokens_per_step = objective.tokens_per_step(exp,
                                                         state.strategy.num_replicas_in_sync)
        train_step = make_train_step(state.model, state.optimizer, state.strategy, tcfg,
                                     exp.optim, objective=objective,
                                     grad_fn=state.grad_fns.get(tcfg.xla),
                                     sharded=state.sharded, experts=state.experts)
        self.train_step = objective.guard(train_step)
        self.eval_step = objective.guard(make_eval_step(state.model, state.strategy, objective))
        self.logger = MetricLogger(workdir, tcfg.steps, enabled=role.is_chief)
        cleanup.callback(self.logger.close)
        self.rss_at_start = memory.log_estimate(self.logger, start, state.memory)
        self.peak_logged = False
        self.recovery = Recovery(state, tcfg, self.logger, workdir)  # rolls back bad steps
        self.best = BestCheckpoint(workdir, state.model, state.step,
                                   tcfg.early_stopping_patience, role.is_chief)
        self.inner = getattr(state.optimizer, "inner_optimizer", state.optimizer)
        self.schedule = make_schedule(exp.optim, exp.decay_steps)  # the optimizer's own
        self.stopped = False
        self.last_train, self.last_eval = {}, {}
        self.window_loss, self.window_steps = 0.0, 0
        self.t_log, self.step_at_log = time.time(), start
        self.t_start = time.time()
        self.watcher = _preemption_watcher(state, log)
        if self.watcher is not None:
            cleanup.callback(self.watcher.close)
        self.profiler = StepProfiler(tcfg.profile_steps, os.path.join(workdir, TENSORBOARD_DIR),
                                     enabled=role.is_chief, log=log)
        cleanup.callback(self.profiler.stop)
        if start >= tcfg.steps:
            log(f"already at step {start} >= --train.steps={tcfg.steps}; nothing to train")

    @classmethod
    def begin(cls, exp: Experiment, workdir: str, log, cleanup: contextlib.ExitStack):
        """Saves the config, builds the state, resumes, and prints what will run."""
        workdir = os.path.abspath(workdir)
        multi = strategy_lib.strategy_name(exp.train) == "multi_worker"
        role = strategy_lib.cluster_role() if multi else strategy_lib.Role()
        objective = make_objective(exp)
        exp = objective.prepare(exp, workdir, role, log)  # inputs checked; stage "auto" resolved
        config_path = os.path.join(workdir, CONFIG_FILE)
        # A resumed run keeps the choices its first run made for "auto" settings.
        exp = autotune.keep_saved(exp, Experiment.load(config_path)
                                  if os.path.exists(config_path) else None)
        memory.check_before_start(exp, role.num_workers)  # --train.memory_budget
        if role.is_chief:
            os.makedirs(workdir, exist_ok=True)
            exp.save(config_path)
            objective.save_tokenizer(os.path.join(workdir, TOKENIZER_DIR))
        log(f"workdir: {workdir}")
        if exp.train.auto_decisions:
            log(f"auto settings kept from {CONFIG_FILE}: {exp.train.auto_decisions}")
        saved = exp
        state = build_state(exp, workdir, objective, role, log=log)
        exp = _resolve_jit(state, log)
        if role.is_chief and exp != saved:  # the resolved "auto" choices, once
            exp.save(config_path)
        state.exp = exp
        cleanup.callback(state.checkpoints.close)
        start = state.checkpoints.restore(log=log)
        state.collectives.check_same(start, "step to resume from")
        if role.is_chief:
            truncate_log(workdir, start)
        trainable, total = count_params(state.model)
        log(f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
        tcfg, replicas = exp.train, state.strategy.num_replicas_in_sync
        global_batch = tcfg.global_batch(replicas)
        log(_describe(state, tcfg))
        log(f"global batch: {global_batch} {objective.examples} = {tcfg.batch_size} per "
            f"replica x {replicas} replicas x {tcfg.grad_accum_steps} accumulation steps "
            f"({objective.tokens_per_step(exp, replicas):,} tokens/step)")
        return cls(exp, workdir, state, start, log, cleanup)

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= self.tcfg.steps

    def run_step(self) -> None:
        """One optimizer step, then whatever its step number is due for."""
        state, tcfg = self.state, self.tcfg
        self.objective.before_step(state, self.step)  # e.g. GRPO samples its batch
        self.profiler.before(self.step + 1)
        out = self.train_step(state.train_iter)
        state.step.assign_add(1)
        self.step += 1
        loss, skipped = float(out["loss"]), float(out["skipped"]) > 0
        self.profiler.after(self.step)
        if not self.peak_logged:  # measured, next to the estimate
            memory.log_peak_rss(self.logger, self.step, state.memory, self.rss_at_start,
                                self.log, state.role.is_chief)
            self.peak_logged = True
        bad = self.recovery.problem(self.step, loss, skipped)
        if bad:
            self.step = self.recovery.roll_back(self.step, bad)
            return
        if not skipped:
            self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
        last = self.step == tcfg.steps
        if self.step % tcfg.log_every == 0 or last:
            self._log_train(out, loss)
        if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or last:
            self.last_eval = self.objective.evaluate(state, self.eval_step)
            self.logger.write(self.step, self.last_eval, "eval")
            self.stopped = self.best.update(self.step, self.last_eval["loss"])
        if self.step % tcfg.checkpoint_every == 0 or last or self.stopped:
            bad = self.recovery.unsaveable(self.step)  # a non-finite weight is never saved
            if bad:
                self.step = self.recovery.roll_back(self.step, bad)
                self.stopped = False
                return
            state.checkpoints.save(self.step)
            self.logger.flush()
        if self.watcher is not None:
            self.watcher.after_step(self.step)  # raises Preempted once every worker saved
        if self.stopped:
            best = self.best
            self.log(f"early stopping at step {self.step}: no better eval loss than "
                     f"{best.best_loss:.4f} (step {best.best_step}) in "
                     f"{tcfg.early_stopping_patience} evaluations; best weights in {best.path}")

    def _applied_steps(self) -> int:
        return int(self.inner.iterations.numpy())  # steps that updated the weights

    def _log_train(self, out: dict, loss: float) -> None:
        now = time.time()
        applied = self._applied_steps()
        self.last_train = {
            "loss": loss, "loss_avg": self.window_loss / max(self.window_steps, 1),
            "lr": float(self.schedule(max(applied - 1, 0))),
            "grad_norm": float(out["grad_norm"]),
            "tokens_per_sec": (self.step - self.step_at_log) * self.tokens_per_step
            / max(now - self.t_log, 1e-9),
            "tokens_seen": self.step * self.tokens_per_step,
            "skipped_steps": self.step - applied,
            **self.objective.log_metrics(self.state.model, out)}
        if precision.is_loss_scaled(self.state.optimizer):
            self.last_train["loss_scale"] = precision.current_scale(self.state.optimizer)
        self.logger.write(self.step, self.last_train, "train")
        self.window_loss, self.window_steps, self.t_log, self.step_at_log = 0.0, 0, now, \
            self.step

    def end(self) -> dict:
        """Closes the log, checks replicas agree, writes the adapter and the plot."""
        state, role, log = self.state, self.state.role, self.log
        seconds = time.time() - self.t_start
        self.logger.close()
        own = state.experts.variables if state.experts else []  # expert parallel
        fingerprint = weights_fingerprint(
            state.model, [v for v in state.model.weights if all(v is not o for o in own)])
        if role.num_workers > 1:  # bitwise-identical replicas, or a bug: say so loudly
            state.collectives.check_same(int(fingerprint, 16) >> 1, "final weights")
        log(f"weights sha256: {fingerprint}")
        if own:
            log(f"this worker's expert weights sha256: {weights_fingerprint(state.model, own)}")
        if role.is_chief and self.tcfg.finetuning_type == "lora":
            path = save_adapter(state.model, self.workdir, self.exp.lora, self.tcfg.init_from)
            log(f"wrote the adapter to {path}")
        plot = plot_losses(self.workdir) if role.is_chief else None
        if plot:
            log(f"wrote {plot}")
        state.collectives.barrier()  # leave together: a peer that exits early looks crashed
        skipped_total = self.step - self._applied_steps()
        log(f"done: step {self.step}, {seconds:.1f}s, {skipped_total} skipped steps; "
            f"workdir: {self.workdir}")
        return {"step": self.step, "train": self.last_train, "eval": self.last_eval,
                "seconds": seconds, "skipped_steps": skipped_total,
                "weights_sha256": fingerprint,
                "best": {"step": self.best.best_step, "loss": self.best.best_loss}}
