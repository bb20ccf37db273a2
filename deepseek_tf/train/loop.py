"""The training runner: set up, (resume,) train, evaluate, checkpoint, log, plot.

The split follows TF Model Garden's task/runner idea as plain functions:
`prepare_run` checks everything a user can get wrong before any graph is built;
`build_state` makes model, optimizer and data under the strategy scope;
`train` runs the loop with its log / eval / checkpoint intervals.

Example:
    >>> result = train(Experiment(), "/tmp/run")
    >>> result["eval"]["loss"]
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import keras
import tensorflow as tf

from deepseek_tf.config import ConfigError, Experiment, UserError
from deepseek_tf.data import pipeline, shards
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import copy_tokenizer, load_tokenizer
from deepseek_tf.flags import CONFIG_FILE
from deepseek_tf.model import DeepSeekCausalLM, count_params
from deepseek_tf.train import checkpoint as ckpt_lib
from deepseek_tf.train.aux_losses import log_metrics
from deepseek_tf.train.logger import MetricLogger, plot_losses, truncate_log
from deepseek_tf.train.optimizer import make_optimizer
from deepseek_tf.train.step import make_eval_step, make_train_step


def data_dir_of(exp: Experiment, workdir: str) -> str:
    return exp.data.data_dir or os.path.join(workdir, "data")


def prepare_run(exp: Experiment, workdir: str, log=print) -> dict:
    """Validates the workdir and the data (preparing it if absent); returns metadata.

    Raises ConfigError / UserError with one clear line; writes nothing into an
    existing workdir before everything checks out.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} exists and is not a directory; choose another.")
    data_dir = data_dir_of(exp, workdir)
    if not os.path.exists(data_dir):
        source = exp.data.inputs or f"the '{exp.data.corpus}' corpus"
        log(f"data directory {data_dir} does not exist yet: preparing {source}")
        prepare(exp.data, data_dir, exp.tokenizer, log=log)
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


@dataclasses.dataclass
class RunState:
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    rng: tf.random.Generator
    train_iter: object
    eval_ds: object
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager


def make_strategy(exp: Experiment) -> tf.distribute.Strategy:
    """The distribution strategy: the default (single device) strategy for now."""
    del exp
    return tf.distribute.get_strategy()


def build_state(exp: Experiment, workdir: str, meta: dict) -> RunState:
    """Model, optimizer, data iterators and checkpoint, built under the strategy."""
    tcfg = exp.train
    if tcfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(tcfg.seed)
    strategy = make_strategy(exp)
    data_dir = data_dir_of(exp, workdir)

    def train_fn(ctx):
        return pipeline.make_dataset(exp.data, data_dir, "train", tcfg.batch_size,
                                     seed=tcfg.seed, training=True,
                                     accum_steps=tcfg.grad_accum_steps, input_context=ctx,
                                     metadata=meta)

    def eval_fn(ctx):
        return pipeline.make_dataset(exp.data, data_dir, "validation", tcfg.batch_size,
                                     seed=tcfg.seed, training=False, input_context=ctx,
                                     metadata=meta)

    with strategy.scope():
        model = DeepSeekCausalLM(exp.model)
        optimizer = make_optimizer(exp.optim, exp.decay_steps, model)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        rng = tf.random.Generator.from_seed(tcfg.seed)
    train_iter = iter(strategy.distribute_datasets_from_function(train_fn))
    eval_ds = strategy.distribute_datasets_from_function(eval_fn)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, rng=rng,
                                     data=train_iter)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, "checkpoints"),
                                         max_to_keep=tcfg.keep_checkpoints, step_counter=step)
    return RunState(strategy, model, optimizer, step, rng, train_iter, eval_ds, checkpoint,
                    manager)


def evaluate(state: RunState, eval_step, num_batches: int) -> dict:
    it = iter(state.eval_ds)
    loss_sum = hits = tokens = 0.0
    for _ in range(num_batches):
        l, h, t = (float(x) for x in eval_step(it))
        loss_sum, hits, tokens = loss_sum + l, hits + h, tokens + t
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "accuracy": hits / max(tokens, 1.0), "tokens": tokens}


def train(exp: Experiment, workdir: str, log=print) -> dict:
    """Trains `exp` in `workdir`, resuming from its latest checkpoint if any.

    Returns {"step", "train": last train metrics, "eval": last eval metrics,
    "seconds": wall time of the loop}.
    """
    workdir = os.path.abspath(workdir)
    meta = prepare_run(exp, workdir, log=log)
    os.makedirs(workdir, exist_ok=True)
    exp.save(os.path.join(workdir, CONFIG_FILE))
    copy_tokenizer(data_dir_of(exp, workdir), os.path.join(workdir, "tokenizer"))
    log(f"workdir: {workdir}")

    state = build_state(exp, workdir, meta)
    start = ckpt_lib.restore_latest(state.checkpoint, state.manager, log=log)
    truncate_log(workdir, start)
    trainable, total = count_params(state.model)
    log(f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
    tcfg = exp.train
    replicas = state.strategy.num_replicas_in_sync
    global_batch = tcfg.global_batch(replicas)
    tokens_per_step = global_batch * exp.data.seq_len
    log(f"global batch: {global_batch} sequences = {tcfg.batch_size} per replica x "
        f"{replicas} replicas x {tcfg.grad_accum_steps} accumulation steps "
        f"({tokens_per_step:,} tokens/step)")

    train_step = make_train_step(state.model, state.optimizer, state.strategy, tcfg, exp.optim)
    eval_step = make_eval_step(state.model, state.strategy)
    # A corrupt shard raises one error naming the file and offset, never skipped silently.
    shard_files = shards.all_shard_paths(data_dir_of(exp, workdir), meta)
    train_step = shards.guard_data_errors(train_step, shard_files)
    eval_step = shards.guard_data_errors(eval_step, shard_files)
    logger = MetricLogger(workdir, tcfg.steps)
    schedule = state.optimizer._learning_rate  # the Keras schedule object
    last_train, last_eval = {}, {}
    window_loss, window_steps = 0.0, 0
    t_log, step_at_log = time.time(), start
    t_start = time.time()
    if start >= tcfg.steps:
        log(f"already at step {start} >= --train.steps={tcfg.steps}; nothing to train")
    step = start
    while step < tcfg.steps:
        out = train_step(state.train_iter)
        state.step.assign_add(1)
        step += 1
        loss = float(out["loss"])
        if not math.isfinite(loss):
            raise UserError(f"loss became {loss} at step {step}; lower --optim.learning_rate "
                            f"or enable clipping. The last good checkpoint is kept.")
        window_loss, window_steps = window_loss + loss, window_steps + 1
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            now = time.time()
            last_train = {
                "loss": loss, "loss_avg": window_loss / window_steps,
                "lr": float(schedule(state.optimizer.iterations - 1)),
                "grad_norm": float(out["grad_norm"]), "accuracy": float(out["accuracy"]),
                "tokens_per_sec": (step - step_at_log) * tokens_per_step / max(now - t_log, 1e-9),
                "tokens_seen": step * tokens_per_step, **log_metrics(state.model, out)}
            logger.write(step, last_train, "train")
            window_loss, window_steps, t_log, step_at_log = 0.0, 0, now, step
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.steps:
            last_eval = evaluate(state, eval_step, tcfg.eval_steps)
            logger.write(step, last_eval, "eval")
        if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
            state.manager.save(checkpoint_number=step)
            logger.flush()
    seconds = time.time() - t_start
    logger.close()
    plot = plot_losses(workdir)
    if plot:
        log(f"wrote {plot}")
    log(f"done: step {step}, {seconds:.1f}s; workdir: {workdir}")
    return {"step": step, "train": last_train, "eval": last_eval, "seconds": seconds}
