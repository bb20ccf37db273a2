"""Expert parallelism: the routed experts of a MoE layer split over W
MultiWorkerMirroredStrategy workers, tokens moved to their experts by all-to-all.

W divides the worker count P: the workers form P / W expert-parallel groups of W
consecutive ranks ({0, 1} and {2, 3} for P = 4, W = 2), each holding every expert once.
Worker r holds shard s = r mod W: experts [s L, (s+1) L) of the E routed experts
(L = E / W); the P / W workers holding the same shard ({0, 2} and {1, 3}) are its
data-parallel replicas. Tokens move within a group only. It routes its
own tokens as without parallelism and fills the static-capacity buffers of all E experts
(`layers/moe.dispatch_combine`, C rows each); `ExpertExchange.to_experts` sends expert
e's buffer to the worker holding e, which runs its L experts on the W C rows it received
(C from each worker), and `from_experts` sends every output row back where it came from.
Each worker fills and drops exactly what it would with all E experts at hand, so outputs,
losses and gradients equal the replicated MoE.

TF registers no gradient for `CollectiveAllToAllV2`; the transpose of an all-to-all is an
all-to-all (block j to worker j, block i from worker i), so `exchange` wraps it in a
`tf.custom_gradient` whose backward is another one: a step runs four. The expert weights'
gradients computed on worker r already sum every worker's tokens (they came to r), so
they are not all-reduced over the world, only summed over the shard's P / W replicas
(`ExpertExchange.sum_replicas`); the router's and the shared experts' are all-reduced
over every worker, as before. With W < P the groups' collectives use group keys of their
own (`sharding.Group`), with the strategy's instance keys and ordering token.

The all-to-alls go through the strategy's collective launcher (`sharding.all_to_all`):
its group, its instance keys in trace order and its ordering token, so they run in one
order with the strategy's all-reduces on every worker. The trainer runs them outside
XLA (`--train.jit_compile=true` is refused, auto picks false).

In the trainer (`--model.expert_parallel=W`, train/loop.py): the model is built inside
`layers/moe.expert_exchange(make_exchange(...))`, so its MoE layers hold their experts as
plain per-worker variables; `LocalAdamW` updates them with moments of their own (the Keras
optimizer gets the mirrored variables only; with `--train.shard_optimizer=zero1|zero2`,
`sharding.ShardedAdamW` shards those W ways); each worker checkpoints its experts and
moments (and its ZeRO shard) in `checkpoints/data-worker-<i>/`, and
`workdir.load_workdir` gathers them.

Example:
    >>> exchange = ExpertExchange(strategy)            # inside strategy.run:
    >>> y, load, dropped = dispatch_combine(x, idx, w, my_gate_up, my_down, capacity,
    ...                                     exchange=exchange)
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.layers.moe import local_variables
from deepseek_tf.train import precision
from deepseek_tf.train.sharding import Group, all_to_all, check_ranks, group_sum
from deepseek_tf.train.strategy import is_multi_worker


def exchange(strategy, x, timeout: float = 0.0, group: Group | None = None) -> tf.Tensor:
    """`sharding.all_to_all(strategy, x, group=group)` with a gradient: the all-to-all of
    the upstream gradient (block i of it goes back to worker i)."""

    @tf.custom_gradient
    def fn(x):
        def grad(dy):
            return all_to_all(strategy, dy, timeout, group)

        return all_to_all(strategy, x, timeout, group), grad

    return fn(x)


class ExpertExchange:
    """Moves MoE buffers between the workers of `strategy` (one device each); the
    `exchange` argument of `layers/moe.dispatch_combine`.

    Args:
      strategy: the run's MultiWorkerMirroredStrategy.
      rank: this worker's index (its replica id; it holds block rank mod W of the experts).
      timeout: seconds an all-to-all waits for its peers (0 = forever).
      ways: W, the workers of one expert-parallel group (0 = all of them).
    """

    def __init__(self, strategy, rank: int = 0, timeout: float = 0.0, ways: int = 0):
        workers = strategy.num_replicas_in_sync
        #: W: the workers the experts are split over (one group)
        self.world = ways or workers
        #: the strategy, this worker's block of experts, the all-to-alls' timeout
        self.strategy, self.rank, self.timeout = strategy, rank % self.world, timeout
        #: workers holding the same block of experts (data-parallel replicas of it)
        self.replicas = workers // self.world
        # group indices: the expert-parallel groups first, then the replica groups
        self.group = None if self.replicas == 1 else Group(self.world, rank // self.world)
        self.replica_group = Group(self.replicas, self.replicas + self.rank)

    def sum_replicas(self, grads: list) -> list:
        """`grads` of this worker's experts summed over the workers holding the same ones."""
        return group_sum(self.strategy, grads, self.replica_group, self.timeout)

    def to_experts(self, xe) -> tf.Tensor:
        """(E, C, d) buffers of this worker's tokens -> (L, W C, d): the rows every
        worker sent to this worker's L experts, worker by worker."""
        e, d = xe.shape[0], xe.shape[-1]
        c = tf.shape(xe)[1]
        local = e // self.world
        got = tf.reshape(exchange(self.strategy, xe, self.timeout, self.group),
                         [self.world, local, c, d])                        # (W, L, C, d)
        return tf.reshape(tf.transpose(got, [1, 0, 2, 3]), [local, self.world * c, d])

    def from_experts(self, ye) -> tf.Tensor:
        """(L, W C, d) outputs of this worker's experts -> (E, C, d): the outputs of
        this worker's own buffer rows, from every expert."""
        local, d = ye.shape[0], ye.shape[-1]
        c = tf.shape(ye)[1] // self.world
        back = tf.transpose(tf.reshape(ye, [local, self.world, c, d]), [1, 0, 2, 3])
        return exchange(self.strategy, tf.reshape(back, [self.world * local, c, d]),
                        self.timeout, self.group)                          # (E, C, d)


def check_run(model_cfg, strategy, num_workers: int, train_cfg) -> None:
    """Raises UserError where `--model.expert_parallel` cannot run: it needs W to
    divide the number of MultiWorkerMirroredStrategy workers, one device each, without XLA
    (its all-to-alls have no XLA kernel)."""
    w = model_cfg.expert_parallel
    if w == 1:
        return
    flag = f"--model.expert_parallel={w}"
    if train_cfg.jit_compile == "true":
        raise UserError(f"{flag} exchanges tokens with collectives XLA cannot compile: use "
                        f"--train.jit_compile=false (or auto).")
    if not is_multi_worker(strategy) or strategy.num_replicas_in_sync != num_workers \
            or num_workers % w:
        raise UserError(f"{flag} places the experts on groups of {w} workers, and this run "
                        f"has {num_workers} worker(s) with {strategy.num_replicas_in_sync} "
                        f"replica(s): start a multiple of {w} workers of one device each "
                        f"(python -m deepseek_tf.launch --num_workers={w}), or set the flag "
                        f"to a divisor of the worker count (1 = off).")


def make_exchange(exp, strategy, role, collectives) -> ExpertExchange | None:
    """The run's `ExpertExchange` (None without expert parallelism), after `check_run`
    and a check that the collectives' ranks are the worker indices (worker i holds
    block i of the experts)."""
    check_run(exp.model, strategy, role.num_workers, exp.train)
    w = exp.model.expert_parallel
    if w == 1:
        return None
    check_ranks(collectives.gather(role.index), w, "--model.expert_parallel")
    return ExpertExchange(strategy, role.index, exp.train.collective_timeout, ways=w)


def local_weights(variables) -> list:
    """The variables of `variables` that are this worker's own (expert-parallel experts,
    made by `layers/moe.local_variables`), not mirrored over the workers."""
    return [v for v in variables
            if not isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)]


class LocalAdamW:
    """AdamW of this worker's own expert weights: moments of its own (plain variables),
    updated with the run's AdamW (`AdamW.fused_update`: its step count, schedule and
    decay) from the worker's gradients, which need no all-reduce.

    Args:
      optimizer: the run's optimizer (our AdamW, or a LossScaleOptimizer around it),
        built on the mirrored variables only.
      variables: this worker's expert variables (`local_weights`).
      exchange: the run's `ExpertExchange` (its replicas of this worker's experts), or
        None: W = the worker count.
    """

    def __init__(self, optimizer, variables, exchange: ExpertExchange | None = None):
        self.inner = optimizer.inner_optimizer if precision.is_loss_scaled(optimizer) \
            else optimizer
        self.variables = list(variables)
        #: the workers holding these experts (their gradients are summed over them)
        self.replicas = exchange.replicas if exchange else 1
        self.exchange = exchange
        with local_variables():
            self.m = [tf.Variable(tf.zeros(v.shape), trainable=False, name="m")
                      for v in self.variables]
            self.v = [tf.Variable(tf.zeros(v.shape), trainable=False, name="v")
                      for v in self.variables]
        #: what the worker's own checkpoint saves: its experts and their moments
        self.state = tf.train.Checkpoint(experts=self.variables, m=self.m, v=self.v)

    def describe(self, world: int) -> str:
        """One line: the expert weights this worker holds."""
        mine = sum(v.shape.num_elements() for v in self.variables)
        copies = f", each block on {self.replicas} workers" if self.replicas > 1 else ""
        return (f"expert parallel over {world} workers: this worker holds {mine:,} of "
                f"{mine * world:,} routed-expert weights (and their AdamW moments){copies}")

    def sum_replicas(self, grads: list) -> list:
        """This worker's expert gradients summed over the workers holding the same experts
        (unchanged where it is the only one). Call in the replica context."""
        return self.exchange.sum_replicas(grads) if self.replicas > 1 else list(grads)

    def apply(self, grads, grad_scale, finite) -> None:
        """Updates the experts with `grad_scale * grads` (if `finite`). Call before the
        run's optimizer applies its gradients (the step count is the same)."""
        inner = self.inner
        for var, g, m, v in zip(self.variables, grads, self.m, self.v):
            new, m2, v2 = inner.fused_update(var, g, m, v, inner.learning_rate,
                                             inner.decay_of(var), grad_scale)
            value = var.value if hasattr(var, "value") else var
            value.assign(tf.where(finite, new, value))
            m.assign(tf.where(finite, m2, m))
            v.assign(tf.where(finite, v2, v))
