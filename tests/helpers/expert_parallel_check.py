"""One worker of the expert-parallel check (tests/train/test_expert_parallel.py):

    python -m deepseek_tf.launch --num_workers=W --module=tests.helpers.expert_parallel_check

Every worker draws the same router, the same E stacked experts and tokens of its own.
The replicated reference: each worker runs all E experts on its tokens
(`dispatch_combine` without an exchange) and all-reduces the gradients. Expert
parallel: each worker holds experts [r L, (r+1) L) as plain (non-mirrored) variables,
tokens move by `ExpertExchange`, only the router's gradients are all-reduced. Printed
per worker, one JSON line `expert parallel check: {...}` per capacity factor: the loss
and the largest differences of outputs, expert, router and token gradients, the pairs dropped
and the expert elements held.
"""

import json

import numpy as np
import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.layers.moe import dispatch_combine, expert_capacity
from deepseek_tf.layers.router import TopkRouter
from deepseek_tf.train.expert_parallel import ExpertExchange
from deepseek_tf.train.strategy import cluster_role, make_strategy

E, K, D, F, N = 8, 2, 16, 8, 24  # experts, top-k, width, expert width, tokens per worker
SUM = tf.distribute.ReduceOp.SUM


def main():
    strategy = make_strategy(TrainConfig(collective_timeout=120))
    rank, world = cluster_role().index, strategy.num_replicas_in_sync
    local = E // world
    rng = np.random.default_rng(0)
    gate_up = rng.normal(0, 0.3, (E, D, 2 * F)).astype(np.float32)
    down = rng.normal(0, 0.3, (E, F, D)).astype(np.float32)
    target = rng.normal(size=(N, D)).astype(np.float32)
    x = np.random.default_rng(1 + rank).normal(size=(N, D)).astype(np.float32)
    with strategy.scope():
        router = TopkRouter(E, K, scoring_func="softmax", topk_method="greedy",
                            initializer_range=0.5, name="gate")
        router.build((None, D))
        router.kernel.assign(rng.normal(0, 0.5, (D, E)).astype(np.float32))
    # plain variables: this worker's own experts (outside the scope: not mirrored)
    mine = [tf.Variable(w[rank * local:(rank + 1) * local]) for w in (gate_up, down)]
    exchange = ExpertExchange(strategy, timeout=120)

    def run(factor):
        def replica():
            ctx = tf.distribute.get_replica_context()
            capacity = expert_capacity(N, K, E, factor)
            full = [tf.constant(gate_up), tf.constant(down)]
            out = {}
            for name, experts, ex in (("ref", full, None), ("ep", mine, exchange)):
                tokens = tf.constant(x)
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(full + [tokens])
                    route = router(tokens)
                    y, _, dropped = dispatch_combine(tokens, route["indices"],
                                                     route["weights"], *experts, capacity,
                                                     exchange=ex)
                    loss = tf.reduce_sum(y * target) / (N * world)
                grads = tape.gradient(loss, router.trainable_variables + list(experts))
                grads = [tf.convert_to_tensor(g) for g in grads]
                n_router = len(router.trainable_variables)
                out[name] = {"y": y, "dropped": ctx.all_reduce(SUM, dropped),
                             "tokens": tape.gradient(loss, tokens),  # this worker's own
                             "loss": ctx.all_reduce(SUM, loss),
                             "router": ctx.all_reduce(SUM, grads[:n_router]),
                             # reference: every worker's gradients of all E experts summed
                             "experts": (ctx.all_reduce(SUM, grads[n_router:]) if ex is None
                                         else grads[n_router:])}
            return out

        out = tf.function(lambda: strategy.run(replica), autograph=False)()
        out = tf.nest.map_structure(lambda t: strategy.experimental_local_results(t)[0], out)
        ref, ep = out["ref"], out["ep"]
        mine_ref = [g[rank * local:(rank + 1) * local] for g in ref["experts"]]
        diff = lambda a, b: max(float(tf.reduce_max(tf.abs(u - v)))  # noqa: E731
                                for u, v in zip(tf.nest.flatten(a), tf.nest.flatten(b)))
        return {"factor": factor, "rank": rank, "loss_ref": float(ref["loss"]),
                "loss_ep": float(ep["loss"]), "y": diff(ref["y"], ep["y"]),
                "expert_grads": diff(mine_ref, ep["experts"]),
                "router_grads": diff(ref["router"], ep["router"]),
                "token_grads": diff(ref["tokens"], ep["tokens"]),
                "expert_grad_scale": max(float(tf.reduce_max(tf.abs(g))) for g in mine_ref),
                "router_grad_scale": max(float(tf.reduce_max(tf.abs(g))) for g in ref["router"]),
                "dropped_ref": float(ref["dropped"]), "dropped_ep": float(ep["dropped"]),
                "expert_elements": sum(int(v.shape.num_elements()) for v in mine),
                "stack_elements": gate_up.size + down.size}

    for factor in (0.0, 0.75):  # dropless, and a capacity that drops pairs
        print("expert parallel check: " + json.dumps(run(factor)), flush=True)


if __name__ == "__main__":
    main()
