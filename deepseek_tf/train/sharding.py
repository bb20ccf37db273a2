"""ZeRO-1 / ZeRO-2 (`--train.shard_optimizer`): each of W MultiWorkerMirroredStrategy
workers keeps the AdamW moments of 1/W of the weights (zero1), and receives only its
1/W of the summed gradients (zero2).

Layout. The trainable variables are laid end to end in one flat float32 space of N
elements, padded to W equal shards of S = ceil(N / W); worker r owns [r S, (r+1) S).
Each step (train/step.py):
- zero1: the gradients are all-reduced as without sharding; the worker slices its shard.
- zero2: the local gradients are reduce-scattered: on GPUs with NCCL's reduce-scatter;
  on CPUs, where TF has no reduce-scatter kernel (`CollectiveReduceScatterV2` is
  NCCL-only), with an all-to-all (row j of the [W, S] gradients goes to worker j) and a
  local sum of the W rows received.
- The global norm (clipping, the overflow decision) is the square root of the all-reduced
  sum of the shards' squared norms.
- The worker updates its shard of the weights with the fused AdamW kernel
  (`AdamW.fused_update`) and its own moments; an all-gather of the updated shards gives
  every worker the whole new weights, assigned to the mirrored variables.
A skipped step (non-finite gradients, mixed_float16 overflow) keeps weights and moments
through selects rather than a branch, so every worker runs the same collectives.
With expert parallelism (train/expert_parallel.py) the trainer gives it the mirrored
weights only: each worker's routed experts are its own, updated by `LocalAdamW`.

The moments are plain `tf.Variable`s created outside the strategy's scope: one pair per
worker with contents of its own (a mirrored variable holds one value everywhere). Each
worker saves them in its own checkpoint (`checkpoints/data-worker-<i>/`, beside its data
position; train/checkpoint.py). The Keras optimizer is built without slots and keeps the
step count, the schedule and, under mixed_float16, the loss scale.

The collectives go through the strategy's own launcher (a private attribute of
MultiWorkerMirroredStrategy): its group, its instance keys (assigned at call time) and
its ordering token, so they run in one order with the strategy's all-reduces on every
worker.

Example:
    >>> sharded = ShardedAdamW(optimizer, model.trainable_variables, strategy, "zero2",
    ...                        rank=role.index)
    >>> sharded.describe()
    'zero2 over 2 workers: ...'
"""

from __future__ import annotations

import math

import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.train import precision
from deepseek_tf.train.strategy import is_multi_worker

SUM = tf.distribute.ReduceOp.SUM
MODES = ("none", "zero1", "zero2")


def resolve(mode: str, strategy, num_workers: int, optim_cfg, variables, log=print) -> str:
    """The sharding this run uses: `mode`, or "none" where sharding is a no-op (one
    worker; said in the log). Raises UserError where it cannot work."""
    if mode == "none":
        return mode
    flag = f"--train.shard_optimizer={mode}"
    if not is_multi_worker(strategy):
        if strategy.num_replicas_in_sync > 1:
            raise UserError(f"{flag} shards over MultiWorkerMirroredStrategy workers, not the "
                            f"replicas of one process: start one worker per device with "
                            f"python -m deepseek_tf.launch, or use --train.shard_optimizer=none.")
        log(f"{flag}: one worker, nothing to shard; every optimizer state stays here")
        return "none"
    if strategy.num_replicas_in_sync != num_workers:
        raise UserError(f"{flag} needs one device per worker (this run has "
                        f"{strategy.num_replicas_in_sync} replicas on {num_workers} "
                        f"workers): give each worker one "
                        f"GPU (python -m deepseek_tf.launch does), or use "
                        f"--train.shard_optimizer=none.")
    if not optim_cfg.fused:
        raise UserError(f"{flag} updates with the fused AdamW kernel: drop "
                        f"--optim.fused=false.")
    others = sorted({tf.as_dtype(v.dtype).name for v in variables} - {"float32"})
    if others:
        raise UserError(f"{flag} shards float32 trainable weights, and this model trains "
                        f"{', '.join(others)} ones: use --train.shard_optimizer=none.")
    return mode


def summed_gradient_bytes(numel: int, world: int, mode: str) -> int:
    """Bytes of the summed float32 gradients a worker holds after the reduction: all of
    them (none, zero1: all-reduced), or its shard of ceil(numel / world) (zero2)."""
    return 4 * (math.ceil(numel / world) if mode == "zero2" else numel)


def check_ranks(order: list[int], mode: str, flag: str = "--train.shard_optimizer") -> None:
    """Worker i owns shard i (with expert parallelism: block i of the experts): the
    collectives' ranks (the order of an all-gather of every worker's index) must be the
    worker indices. Raises UserError if they are not; `flag={mode}` is the setting that
    needs them."""
    if order != list(range(len(order))):
        off = "none" if flag == "--train.shard_optimizer" else "1"
        raise UserError(f"{flag}={mode}: the workers' collective ranks do "
                        f"not follow their indices (an all-gather of the indices gave "
                        f"{order}); use {flag}={off} on this cluster.")


def _launcher(strategy):
    """The strategy's collective launcher of this worker's one device."""
    return strategy.extended._cross_device_ops._launchers[0]  # pylint: disable=protected-access


#: first group key of the worker sub-groups (`Group`): far above the keys
#: MultiWorkerMirroredStrategy's CollectiveKeys hands out (1, 2, ... per device set)
SUBGROUP_KEY_BASE = 1 << 20


class Group:
    """A sub-group of the workers for collectives beside the strategy's own: its size and
    a group key that no other group of the run uses (`SUBGROUP_KEY_BASE` + `index`).

    Args:
      size: the number of workers in the group.
      index: which group of the run (distinct per group; the same on every member).
    """

    def __init__(self, size: int, index: int):
        self.size, self.key = size, SUBGROUP_KEY_BASE + index


def _collective_args(strategy, group: Group | None = None) -> dict:
    """group_size, group_key, instance_key and ordering_token of the next collective op of
    the strategy's launcher: its group (or `group`), the next of its instance keys (taken
    at trace time, in one order on every worker) and its ordering token (the op runs in
    program order with the strategy's own all-reduces)."""
    launcher = _launcher(strategy)
    token = launcher._get_ordering_token()
    size, key = ((strategy.num_replicas_in_sync, launcher._group_key) if group is None
                 else (group.size, group.key))
    return {"group_size": size, "group_key": key,
            "instance_key": launcher._next_instance_key(),
            "ordering_token": [] if token is None else [token]}


def all_to_all(strategy, x, timeout: float = 0.0, group: Group | None = None) -> tf.Tensor:
    """All-to-all over the workers of a MultiWorkerMirroredStrategy (one device each), in
    its replica context: `x` (W * R, ...) is cut into W blocks of R rows along axis 0;
    block j goes to worker j, and block i of the result (same shape) came from worker i.
    No gradient is registered (see `expert_parallel.exchange`).

    Args:
      strategy: the run's MultiWorkerMirroredStrategy.
      x: the tensor to exchange; its first dimension a multiple of the worker count.
      timeout: seconds the op waits for its peers (0 = forever).
      group: a sub-group of the workers (W = its size, j = the rank in it), or None: all.
    """
    size = strategy.num_replicas_in_sync if group is None else group.size
    rows = tf.reshape(x, [size, -1])  # the op's first dim is W
    with tf.device(_launcher(strategy)._device):
        rows = tf.raw_ops.CollectiveAllToAllV2(
            input=rows, **_collective_args(strategy, group), communication_hint="auto",
            timeout_seconds=timeout)
    return tf.reshape(rows, tf.shape(x))


def group_sum(strategy, tensors: list, group: Group, timeout: float = 0.0) -> list:
    """The sum of `tensors` (float32) over the workers of `group`, in the replica context
    of the run's MultiWorkerMirroredStrategy (one all-reduce of them laid end to end)."""
    if group.size == 1 or not tensors:
        return list(tensors)
    sizes = [t.shape.num_elements() for t in tensors]
    flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)
    with tf.device(_launcher(strategy)._device):
        flat = tf.raw_ops.CollectiveReduceV2(
            input=flat, **_collective_args(strategy, group), merge_op="Add", final_op="Id",
            communication_hint="auto", timeout_seconds=timeout)
    return [tf.reshape(x, t.shape) for x, t in zip(tf.split(flat, sizes), tensors)]


class ShardedAdamW:
    """AdamW whose moments (and, for zero2, summed gradients) are sharded over workers.

    Args:
      optimizer: the run's optimizer (our AdamW, or a LossScaleOptimizer around it),
        built without slots (`make_optimizer(..., slots=False)`).
      variables: the trainable variables (mirrored, float32).
      strategy: the run's MultiWorkerMirroredStrategy (one device per worker).
      mode: "zero1" or "zero2".
      rank: this worker's index (its replica id).
      timeout: seconds a collective waits for its peers (0 = forever).
    """

    def __init__(self, optimizer, variables, strategy, mode: str, rank: int,
                 timeout: float = 0.0):
        self.optimizer, self.strategy, self.mode = optimizer, strategy, mode
        self.inner = optimizer.inner_optimizer if precision.is_loss_scaled(optimizer) \
            else optimizer
        self.variables = list(variables)
        self.world, self.rank, self.timeout = strategy.num_replicas_in_sync, rank, timeout
        self.shapes = [v.shape for v in self.variables]
        self.sizes = [v.shape.num_elements() for v in self.variables]
        self.numel = sum(self.sizes)
        self.shard = math.ceil(self.numel / self.world)
        self.padded = self.shard * self.world
        begin, end = rank * self.shard, min((rank + 1) * self.shard, self.numel)
        #: (variable index, first flat element, length) of each piece of this worker's shard
        self.pieces, offset = [], 0
        for i, size in enumerate(self.sizes):
            lo, hi = max(begin, offset), min(end, offset + size)
            if lo < hi:
                self.pieces.append((i, lo - offset, hi - lo))
            offset += size
        self.owned = sum(n for _, _, n in self.pieces)  # S, less the padding of the last
        with tf.init_scope():  # plain variables: this worker's own values
            self.m = tf.Variable(tf.zeros([self.shard]), trainable=False, name="m")
            self.v = tf.Variable(tf.zeros([self.shard]), trainable=False, name="v")
        #: what the worker's own checkpoint saves
        self.slots = tf.train.Checkpoint(m=self.m, v=self.v)

    def describe(self) -> str:
        """One line: what this worker holds, in bytes of its variables and gradients."""
        mine = sum(x.shape.num_elements() * x.dtype.size for x in (self.m, self.v))
        full = 2 * 4 * self.numel
        grads = self.gradient_bytes()
        return (f"{self.mode} over {self.world} workers: this worker keeps AdamW moments of "
                f"{self.owned:,} of {self.numel:,} weights ({mine / 2**20:.2f} of "
                f"{full / 2**20:.2f} MiB) and {grads / 2**20:.2f} MiB of summed gradients "
                f"(unsharded {4 * self.numel / 2**20:.2f})")

    def gradient_bytes(self) -> int:
        """Bytes of the summed gradients this worker holds each step."""
        return summed_gradient_bytes(self.numel, self.world, self.mode)

    def _flat(self, tensors) -> tf.Tensor:
        flat = tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], 0)
        return tf.pad(flat, [[0, self.padded - self.numel]])  # (W S,)

    def _mine(self, tensors) -> tf.Tensor:
        """This worker's shard of per-variable `tensors`, (S,)."""
        parts = [tf.reshape(tensors[i], [-1])[lo:lo + n] for i, lo, n in self.pieces]
        parts.append(tf.zeros([self.shard - self.owned]))
        return tf.concat(parts, 0)

    def summed_shard(self, ctx, grads) -> tf.Tensor:
        """This worker's shard of the gradients summed over workers, (S,)."""
        if self.mode == "zero1":
            return self._mine(ctx.all_reduce(SUM, grads))
        launcher = _launcher(self.strategy)
        flat = self._flat(grads)
        if "GPU" in launcher._device.upper():  # NCCL's reduce-scatter
            with tf.device(launcher._device):
                return tf.raw_ops.CollectiveReduceScatterV2(
                    input=flat, **_collective_args(self.strategy), merge_op="Add",
                    final_op="Id", communication_hint="nccl", timeout_seconds=self.timeout)
        rows = all_to_all(self.strategy, tf.reshape(flat, [self.world, self.shard]),
                          self.timeout)  # row j from worker j, (W, S)
        return tf.reduce_sum(rows, axis=0)

    def _decay(self) -> tf.Tensor:
        """The weight decay of each element of this worker's shard, (S,)."""
        decays = [self.inner.decay_of(self.variables[i]) for i, _, _ in self.pieces] + [0.0]
        counts = [n for _, _, n in self.pieces] + [self.shard - self.owned]
        return tf.repeat(tf.constant(decays, tf.float32), counts)

    def apply(self, ctx, grad_shard, grad_scale, finite) -> None:
        """Updates this worker's shard with `grad_scale * grad_shard` (if `finite`), then
        every weight from all workers' shards. Call in the replica context."""
        inner = self.inner
        weights = self._mine([tf.convert_to_tensor(v) for v in self.variables])
        new, m, v = inner.fused_update(weights, grad_shard, self.m, self.v,
                                       inner.learning_rate, self._decay(), grad_scale)
        new, m, v = (tf.where(finite, a, b) for a, b in ((new, weights), (m, self.m),
                                                          (v, self.v)))
        self.m.assign(m)
        self.v.assign(v)
        full = ctx.all_gather(new, axis=0)[:self.numel]  # (N,)
        values = [tf.reshape(x, s) for x, s in zip(tf.split(full, self.sizes), self.shapes)]
        updates = list(zip(self.variables, values))
        updates.append((inner.iterations, inner.iterations + tf.cast(finite, tf.int64)))
        if precision.is_loss_scaled(self.optimizer):
            updates += self._loss_scale_updates(finite)
        tf.__internal__.distribute.interim.maybe_merge_call(_assign_all, self.strategy,
                                                            updates)

    def _loss_scale_updates(self, finite):
        """LossScaleOptimizer's dynamic scale rule: halve on overflow, double after
        `dynamic_growth_steps` good steps in a row."""
        opt = self.optimizer
        counter, scale = tf.convert_to_tensor(opt.step_counter), opt.dynamic_scale
        grow = tf.logical_and(finite, tf.equal(counter, opt.dynamic_growth_steps - 1))
        zero = tf.zeros_like(counter)
        return [(opt.step_counter, tf.where(finite, tf.where(grow, zero, counter + 1), zero)),
                (scale, tf.where(finite, tf.where(grow, scale * 2.0, scale * 1.0),
                                 scale * 0.5))]


def _assign_all(strategy, updates):
    for var, value in updates:
        var = getattr(var, "value", var)  # a Keras variable's tf.Variable (mirrored)
        strategy.extended.update(var, lambda x, y: x.assign(tf.cast(y, x.dtype)),
                                 args=(value,), group=False)
