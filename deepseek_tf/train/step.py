"""The distributed train and eval steps.

One step for every stage: the loss comes from an objective (train/objectives.py;
pretrain / sft token cross entropy by default, DPO in train/dpo.py).

Loss normalisation: every replica's micro-batch loss is its summed loss (tokens, or
pairs for DPO) divided by the objective's weight of the *global* batch (all replicas,
all accumulation micro-batches). Gradients are summed over micro-batches and
all-reduced (SUM) once per step, so accumulation and any number of replicas give
the large-batch step. Clipping uses the global norm of the all-reduced gradients.

With `--train.shard_optimizer=zero1|zero2` (train/sharding.py) each worker reduces the
gradients to its own shard of them (zero1: all-reduce, then its slice; zero2:
reduce-scatter), takes the global norm from every worker's shard, updates its shard of
the weights and all-gathers the rest; the decisions (clipping, skipping) are the same.
With expert parallelism (`--model.expert_parallel`, train/expert_parallel.py) each
worker's routed experts keep their gradients and are updated by their worker alone; their
squares join the global norm, and ZeRO (if on) shards only the mirrored weights.

Models with MoE layers or MTP modules also return side outputs; `aux_losses` adds
their losses to the micro-batch loss, accumulates their stats (expert load, dropped
tokens) with the gradients, and updates the router biases after `apply_gradients`.

Mixed precision (train/precision.py): under mixed_float16 the loss is multiplied
by the loss scale, and the decision to skip an overflowing step is global: it is
taken from the global norm of the *all-reduced* gradients (an inf or NaN on any
replica makes the sum, and so the norm, non-finite on every replica), before anyone
applies anything. Dropout masks come from a stateless seed per (step, replica,
micro-batch), so remat recomputes the same masks.

Per-parameter passes. Outside XLA every element-wise op over the gradients is a
full pass over memory, which at many experts is a large share of the step. The
step makes two: the global norm, and the fused AdamW update, which also multiplies
in the clipping coefficient (`AdamW.scaled_gradients`). There is no separate
non-finite count and no clipped copy of the gradients.

Example:
    >>> step_fn = make_train_step(model, optimizer, strategy, TrainConfig(), OptimConfig())
    >>> metrics = step_fn(iterator)   # one optimizer step
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.config import OptimConfig, TrainConfig
from deepseek_tf.layers.remat import fold_seed
from deepseek_tf.train import precision
from deepseek_tf.train.objectives import TokenObjective
from deepseek_tf.train.strategy import next_batch

SUM = tf.distribute.ReduceOp.SUM


def make_grad_fn(model, accum_steps: int, jit_compile: bool, objective=None):
    """(batch with (A, B, ...) tensors, global weight, loss scale, dropout seed)
    -> (grads of the scaled loss, loss, stats).

    The compute part of the step; under `jit_compile` it is one XLA cluster. `loss` is
    the objective's loss (`objective.forward`'s loss sum / the global weight, e.g. the
    token cross entropy); the gradients also include its extra (aux) terms; `stats` are
    the objective's sums over the micro-batches. `objective` defaults to the token
    cross entropy of pretrain / sft (train/objectives.py).
    """
    objective = objective or TokenObjective()
    variables = model.trainable_variables

    def micro(batch, denom, scale, seed):
        with tf.GradientTape() as tape:
            loss_sum, extra, stats = objective.forward(model, batch, True, seed, jit_compile)
            loss = loss_sum / denom
            total = loss if extra is None else loss + extra / denom
            scaled = total * scale
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, variables)]  # dense
        return grads, loss, stats

    def grad_fn(batch, denom, scale=1.0, seed=None):
        first = {k: v[0] for k, v in batch.items()}
        grads, loss, stats = micro(first, denom, scale, fold_seed(seed, 0))
        if accum_steps == 1:
            return grads, loss, stats

        def body(i, grads, loss, stats):
            g, l, s = micro({k: v[i] for k, v in batch.items()}, denom, scale,
                            fold_seed(seed, i))
            return (i + 1, [a + b for a, b in zip(grads, g)], loss + l,
                    {k: stats[k] + s[k] for k in stats})

        _, grads, loss, stats = tf.while_loop(
            lambda i, *_: i < accum_steps, body, (tf.constant(1), grads, loss, stats))
        return grads, loss, stats

    return tf.function(grad_fn, jit_compile=jit_compile, autograph=False)


def xla_twin(fn):
    """`fn` (a tf.function without XLA) XLA-compiled without tracing its Python again.

    The twin's graph is one call of `fn`'s traced graph (the call shares `fn`'s cache:
    same arguments, same concrete function), and XLA compiles the call with everything
    inside it. `jit_compile=auto` times a step both ways: with the twin, the model's
    forward + backward is traced once instead of twice (seconds per trace on a CPU).
    """
    return tf.function(lambda *args: fn(*args), jit_compile=True, autograph=False)


def make_finish_fn(clip_norm: float, jit_compile: bool):
    """(all-reduced grads, loss scale, squared norm of other gradients or None) -> (grads
    to apply, scaled global norm, finite, clipping coefficient).

    Decides the step (skipped on every replica alike when the norm of the all-reduced
    gradients is not finite) and computes the coefficient that clips to `clip_norm`
    (of the unscaled gradients); the optimizer multiplies it in. Under `jit_compile`
    this is one XLA cluster.
    """

    def finish(grads, scale, extra_square=None):
        norm = tf.linalg.global_norm(grads)
        if extra_square is not None:
            norm = tf.sqrt(tf.square(norm) + extra_square)
        finite, coef = decide(norm, scale, clip_norm)
        grads = precision.poison(grads, finite)  # the same decision on every replica
        return grads, norm, finite, coef

    return tf.function(finish, jit_compile=jit_compile, autograph=False)


def decide(norm, scale, clip_norm: float):
    """(finite, clipping coefficient) from the global norm of the scaled summed gradients:
    the step is skipped when the norm is not finite; the coefficient clips the unscaled
    gradients to `clip_norm` (as tf.clip_by_global_norm; 1 when off or not finite)."""
    finite = tf.math.is_finite(norm)
    coef = tf.constant(1.0)
    if clip_norm > 0:
        limit = clip_norm * scale
        coef = tf.where(finite, limit / tf.maximum(norm, limit), 1.0)
    return finite, coef


def apply_scaled(optimizer, grads, variables, coef) -> None:
    """`optimizer.apply_gradients` of `coef * grads`, the multiplication done inside our
    AdamW (`train/optimizer.py`), also when a LossScaleOptimizer wraps it."""
    inner = optimizer.inner_optimizer if precision.is_loss_scaled(optimizer) else optimizer
    with inner.scaled_gradients(coef):
        optimizer.apply_gradients(zip(grads, variables))


def make_train_step(model, optimizer, strategy: tf.distribute.Strategy, train_cfg: TrainConfig,
                    optim_cfg: OptimConfig, *, objective=None, grad_hook=None, grad_fn=None,
                    sharded=None, experts=None):
    """Returns `step(iterator) -> dict of float32 tensors` (loss, grad_norm, skipped: 1
    if the step was skipped because a gradient overflowed, and the objective's
    `step_metrics`: for pretrain / sft accuracy, loss_tokens and the
    `aux_losses.step_metrics` of MoE / MTP models).

    `grad_hook(grads, replica_id) -> grads`, if given, edits each replica's local
    gradients before the all-reduce (tests inject faults with it). `grad_fn`: the
    `make_grad_fn` of this model, objective and `train_cfg` already built (by
    `jit_compile=auto`'s timing, traced and compiled); None builds it here. `sharded`: a
    `sharding.ShardedAdamW` (ZeRO-1/2: gradients reduced to this worker's shard, which
    it updates) or None (every replica all-reduces and applies everything). `experts`: an
    `expert_parallel.LocalAdamW` (this worker's own experts: their gradients are not
    all-reduced, their squares join the global norm) or None. Both may be given: ZeRO
    then shards the mirrored weights' state only (`sharded` built on them).
    """
    objective = objective or TokenObjective()
    grad_fn = grad_fn or make_grad_fn(model, train_cfg.grad_accum_steps, train_cfg.xla,
                                      objective)
    finish = make_finish_fn(optim_cfg.clip_norm, train_cfg.xla)
    variables = model.trainable_variables
    mine = {id(v) for v in experts.variables} if experts else set()
    is_mine = [id(v) in mine for v in variables]
    replicated = [v for v, m in zip(variables, is_mine) if not m]

    def replica_step(batch):
        ctx = tf.distribute.get_replica_context()
        weight = ctx.all_reduce(SUM, objective.weight(batch))  # global tokens / pairs
        denom = tf.maximum(weight, 1.0)
        scale = precision.loss_scale(optimizer)
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(train_cfg.seed, tf.int64),
                      tf.cast(optimizer.iterations, tf.int64)]), ctx.replica_id_in_sync_group)
        grads, loss, stats = grad_fn(batch, denom, scale, seed)
        if grad_hook is not None:
            grads = grad_hook(grads, ctx.replica_id_in_sync_group)
        own = [g for g, m in zip(grads, is_mine) if m]  # expert parallel: this worker's
        grads = [g for g, m in zip(grads, is_mine) if not m]
        if own:  # summed over the workers holding the same experts (if any)
            own = experts.sum_replicas(own)
        # this worker's experts' share of the squared global norm (their gradients stay
        # here); each block of experts counted once: 1 / replicas from each holder
        own_square = tf.add_n([tf.reduce_sum(tf.square(g)) for g in own]) if own else None
        if own and experts.replicas > 1:
            own_square /= experts.replicas
        if sharded is None:
            if own:
                own_square = ctx.all_reduce(SUM, own_square)
            grads = ctx.all_reduce(SUM, grads)
        else:
            shard = sharded.summed_shard(ctx, grads)  # (S,) of the flat mirrored gradients
        loss = ctx.all_reduce(SUM, loss)
        stats = ctx.all_reduce(SUM, stats)
        if sharded is None:
            grads, scaled_norm, finite, coef = finish(grads, scale, own_square)
        else:  # the global norm from every worker's shard (and its experts)
            square = tf.reduce_sum(tf.square(shard))
            if own:
                square += own_square
            scaled_norm = tf.sqrt(ctx.all_reduce(SUM, square))
            finite, coef = decide(scaled_norm, scale, optim_cfg.clip_norm)
        if experts is not None:  # first: at the optimizer's step count
            experts.apply(own, coef / scale, finite)
        if sharded is None:
            apply_scaled(optimizer, grads, replicated, coef)  # skipped if not finite (fp16)
        else:
            sharded.apply(ctx, shard, coef / scale, finite)  # skipped if not finite
        # After the update: e.g. router biases move from the global load (not on a skipped step).
        metrics = objective.step_metrics(model, stats, denom, update=finite)
        return {"loss": loss, "grad_norm": scaled_norm / scale,
                "skipped": 1.0 - tf.cast(finite, tf.float32), **metrics}

    @tf.function(autograph=False)
    def step(iterator):
        out = strategy.run(replica_step, args=(next_batch(strategy, iterator),))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    return step


def make_eval_step(model, strategy: tf.distribute.Strategy, objective=None):
    """Returns `step(iterator) -> dict` of the objective's evaluation sums (loss_sum,
    weight and its stats, e.g. hits) summed over all replicas."""
    objective = objective or TokenObjective()

    def replica_step(batch):
        loss_sum, _, stats = objective.forward(model, batch, False)
        sums = {"loss_sum": loss_sum, "weight": objective.weight(batch), **stats}
        return tf.distribute.get_replica_context().all_reduce(SUM, sums)

    @tf.function(autograph=False)
    def step(iterator):
        out = strategy.run(replica_step, args=(next_batch(strategy, iterator),))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    return step
