"""The distributed train and eval steps.

Loss normalisation: every replica's micro-batch loss is its summed token loss
divided by the number of loss tokens in the *global* batch (all replicas, all
accumulation micro-batches). Gradients are summed over micro-batches and
all-reduced (SUM) once per step, so accumulation and any number of replicas give
the large-batch step. Clipping uses the global norm of the all-reduced gradients.

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
from deepseek_tf.model import token_losses
from deepseek_tf.train import aux_losses, precision
from deepseek_tf.train.strategy import next_batch

SUM = tf.distribute.ReduceOp.SUM


def _forward(model, batch, training, with_aux=False, dropout_seed=None):
    """(CE loss sum, hits) or, `with_aux`, (CE loss sum, hits, extra loss sum, stats)."""
    out = model(batch["inputs"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], training=training, return_aux=with_aux,
                dropout_seed=dropout_seed)
    logits = out[0] if with_aux else out                                  # (B, T, V)
    mask = batch["loss_mask"]
    loss_sum = tf.reduce_sum(token_losses(logits, batch["targets"]) * mask)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["targets"]),
                   tf.float32)
    if not with_aux:
        return loss_sum, tf.reduce_sum(hits * mask)
    return (loss_sum, tf.reduce_sum(hits * mask)) + aux_losses.aux_terms(model.config, out[1],
                                                                         batch)


def make_grad_fn(model, accum_steps: int, jit_compile: bool):
    """(batch with (A, B, T) tensors, global token count, loss scale, dropout seed)
    -> (grads of the scaled loss, loss, hits, stats).

    The compute part of the step; under `jit_compile` it is one XLA cluster. `loss`
    is the cross entropy; the gradients include the aux losses; `stats` are the
    summed aux statistics ({} for a dense model without MTP).
    """
    variables = model.trainable_variables
    with_aux = aux_losses.uses_aux(model.config)

    def micro(batch, denom, scale, seed):
        with tf.GradientTape() as tape:
            out = _forward(model, batch, training=True, with_aux=with_aux, dropout_seed=seed)
            loss_sum, hits = out[:2]
            extra, stats = out[2:] if with_aux else (0.0, {})
            loss = loss_sum / denom
            total = loss + extra / denom if with_aux else loss
            scaled = total * scale
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, variables)]  # dense
        return grads, loss, hits, stats

    def grad_fn(batch, denom, scale=1.0, seed=None):
        first = {k: v[0] for k, v in batch.items()}
        grads, loss, hits, stats = micro(first, denom, scale, fold_seed(seed, 0))
        if accum_steps == 1:
            return grads, loss, hits, stats

        def body(i, grads, loss, hits, stats):
            g, l, h, s = micro({k: v[i] for k, v in batch.items()}, denom, scale,
                               fold_seed(seed, i))
            return (i + 1, [a + b for a, b in zip(grads, g)], loss + l, hits + h,
                    {k: stats[k] + s[k] for k in stats})

        _, grads, loss, hits, stats = tf.while_loop(
            lambda i, *_: i < accum_steps, body, (tf.constant(1), grads, loss, hits, stats))
        return grads, loss, hits, stats

    return tf.function(grad_fn, jit_compile=jit_compile)


def make_finish_fn(clip_norm: float, jit_compile: bool):
    """(all-reduced grads, loss scale) -> (grads to apply, scaled global norm, finite,
    clipping coefficient).

    Decides the step (skipped on every replica alike when the norm of the all-reduced
    gradients is not finite) and computes the coefficient that clips to `clip_norm`
    (of the unscaled gradients); the optimizer multiplies it in. Under `jit_compile`
    this is one XLA cluster.
    """

    def finish(grads, scale):
        norm = tf.linalg.global_norm(grads)
        finite = tf.math.is_finite(norm)
        grads = precision.poison(grads, finite)  # the same decision on every replica
        coef = tf.constant(1.0)
        if clip_norm > 0:  # as tf.clip_by_global_norm; 1 when the norm is not finite
            limit = clip_norm * scale
            coef = tf.where(finite, limit / tf.maximum(norm, limit), 1.0)
        return grads, norm, finite, coef

    return tf.function(finish, jit_compile=jit_compile)


def apply_scaled(optimizer, grads, variables, coef) -> None:
    """`optimizer.apply_gradients` of `coef * grads`, the multiplication done inside our
    AdamW (`train/optimizer.py`), also when a LossScaleOptimizer wraps it."""
    inner = optimizer.inner_optimizer if precision.is_loss_scaled(optimizer) else optimizer
    with inner.scaled_gradients(coef):
        optimizer.apply_gradients(zip(grads, variables))


def make_train_step(model, optimizer, strategy: tf.distribute.Strategy, train_cfg: TrainConfig,
                    optim_cfg: OptimConfig, *, grad_hook=None):
    """Returns `step(iterator) -> dict of float32 tensors` (loss, grad_norm, accuracy,
    loss_tokens, skipped: 1 if the step was skipped because a gradient overflowed, and
    the `aux_losses.step_metrics` of MoE / MTP models).

    `grad_hook(grads, replica_id) -> grads`, if given, edits each replica's local
    gradients before the all-reduce (tests inject faults with it).
    """
    grad_fn = make_grad_fn(model, train_cfg.grad_accum_steps, train_cfg.xla)
    finish = make_finish_fn(optim_cfg.clip_norm, train_cfg.xla)
    variables = model.trainable_variables

    def replica_step(batch):
        ctx = tf.distribute.get_replica_context()
        tokens = ctx.all_reduce(SUM, tf.reduce_sum(batch["loss_mask"]))
        scale = precision.loss_scale(optimizer)
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(train_cfg.seed, tf.int64),
                      tf.cast(optimizer.iterations, tf.int64)]), ctx.replica_id_in_sync_group)
        grads, loss, hits, stats = grad_fn(batch, tf.maximum(tokens, 1.0), scale, seed)
        if grad_hook is not None:
            grads = grad_hook(grads, ctx.replica_id_in_sync_group)
        grads = ctx.all_reduce(SUM, grads)
        loss, hits = ctx.all_reduce(SUM, [loss, hits])
        stats = ctx.all_reduce(SUM, stats) if stats else {}  # {}: dense, no MTP
        grads, scaled_norm, finite, coef = finish(grads, scale)
        apply_scaled(optimizer, grads, variables, coef)  # skipped if not finite (fp16)
        # After the update: router biases move from the global load (not on a skipped step).
        aux_metrics = aux_losses.step_metrics(model, stats, tokens, update=finite)
        return {"loss": loss, "grad_norm": scaled_norm / scale,
                "accuracy": hits / tf.maximum(tokens, 1.0), "loss_tokens": tokens,
                "skipped": 1.0 - tf.cast(finite, tf.float32), **aux_metrics}

    @tf.function
    def step(iterator):
        out = strategy.run(replica_step, args=(next_batch(strategy, iterator),))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    return step


def make_eval_step(model, strategy: tf.distribute.Strategy):
    """Returns `step(iterator) -> (loss_sum, hits, tokens)` summed over all replicas."""

    def replica_step(batch):
        loss_sum, hits = _forward(model, batch, training=False)
        tokens = tf.reduce_sum(batch["loss_mask"])
        return tf.distribute.get_replica_context().all_reduce(SUM, [loss_sum, hits, tokens])

    @tf.function
    def step(iterator):
        out = strategy.run(replica_step, args=(next_batch(strategy, iterator),))
        return [strategy.experimental_local_results(v)[0] for v in out]

    return step
