"""Expert parallelism: the routed experts of a MoE layer split over W
MultiWorkerMirroredStrategy workers, tokens moved to their experts by all-to-all.

Worker r holds experts [r L, (r+1) L) of the E routed experts (L = E / W). It routes its
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
they are not all-reduced; the router's and the shared experts' are, as before.

The all-to-alls go through the strategy's collective launcher (`sharding.all_to_all`):
its group, its instance keys in trace order and its ordering token, so they run in one
order with the strategy's all-reduces on every worker. Run them outside XLA (TF has no
XLA kernel for them on CPU).

Example:
    >>> exchange = ExpertExchange(strategy)            # inside strategy.run:
    >>> y, load, dropped = dispatch_combine(x, idx, w, my_gate_up, my_down, capacity,
    ...                                     exchange=exchange)
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.train.sharding import all_to_all


def exchange(strategy, x, timeout: float = 0.0) -> tf.Tensor:
    """`sharding.all_to_all(strategy, x)` with a gradient: the all-to-all of the
    upstream gradient (block i of it goes back to worker i)."""

    @tf.custom_gradient
    def fn(x):
        def grad(dy):
            return all_to_all(strategy, dy, timeout)

        return all_to_all(strategy, x, timeout), grad

    return fn(x)


class ExpertExchange:
    """Moves MoE buffers between the workers of `strategy` (one device each); the
    `exchange` argument of `layers/moe.dispatch_combine`.

    Args:
      strategy: the run's MultiWorkerMirroredStrategy.
      timeout: seconds an all-to-all waits for its peers (0 = forever).
    """

    def __init__(self, strategy, timeout: float = 0.0):
        self.strategy, self.timeout = strategy, timeout
        self.world = strategy.num_replicas_in_sync

    def to_experts(self, xe) -> tf.Tensor:
        """(E, C, d) buffers of this worker's tokens -> (L, W C, d): the rows every
        worker sent to this worker's L experts, worker by worker."""
        e, d = xe.shape[0], xe.shape[-1]
        c = tf.shape(xe)[1]
        local = e // self.world
        got = tf.reshape(exchange(self.strategy, xe, self.timeout),
                         [self.world, local, c, d])                        # (W, L, C, d)
        return tf.reshape(tf.transpose(got, [1, 0, 2, 3]), [local, self.world * c, d])

    def from_experts(self, ye) -> tf.Tensor:
        """(L, W C, d) outputs of this worker's experts -> (E, C, d): the outputs of
        this worker's own buffer rows, from every expert."""
        local, d = ye.shape[0], ye.shape[-1]
        c = tf.shape(ye)[1] // self.world
        back = tf.transpose(tf.reshape(ye, [local, self.world, c, d]), [1, 0, 2, 3])
        return exchange(self.strategy, tf.reshape(back, [self.world * local, c, d]),
                        self.timeout)                                      # (E, C, d)
