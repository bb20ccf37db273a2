"""One worker of the expert-parallel check (tests/train/test_expert_parallel.py):

    python -m deepseek_tf.launch --num_workers=W --module=tests.helpers.expert_parallel_check

Every worker builds, inside the strategy's scope, a replicated `DeepSeekMoE` (all E
experts) and one with `expert_parallel=W`, both with the same router, shared expert and
E experts (the expert-parallel worker r holds experts [r E / W, (r+1) E / W) as plain
variables), and runs both on tokens of its own. Reference: every gradient all-reduced.
Expert parallel: tokens move by `ExpertExchange`; the router's and the shared expert's
gradients are all-reduced, the experts' are not. Printed per worker, one JSON line
`expert parallel check: {...}` per capacity factor: the losses, the largest differences
of outputs and of expert, other (router, shared) and token gradients, the pairs dropped,
the expert elements held and whether the variables are mirrored.
"""

import json

import numpy as np
import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.layers.moe import DeepSeekMoE, expert_exchange
from deepseek_tf.train.expert_parallel import ExpertExchange
from deepseek_tf.train.strategy import cluster_role, make_strategy

E, K, D, F, B, T = 8, 2, 16, 8, 2, 12  # experts, top-k, width, expert width, batch, length
SUM = tf.distribute.ReduceOp.SUM


def _is_expert(v) -> bool:
    return v.path.split("/")[-1] in ("gate_up_proj", "down_proj")


def _mirrored(v) -> bool:
    return isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)


def main():
    strategy = make_strategy(TrainConfig(collective_timeout=120))
    rank, world = cluster_role().index, strategy.num_replicas_in_sync
    local = E // world
    kwargs = dict(hidden_size=D, num_experts=E, top_k=K, moe_intermediate_size=F,
                  n_shared_experts=1, scoring_func="softmax", topk_method="greedy")
    with strategy.scope():
        ref = DeepSeekMoE(**kwargs, name="ref")
        with expert_exchange(ExpertExchange(strategy, rank, timeout=120)):
            ep = DeepSeekMoE(**kwargs, expert_parallel=world, name="ep")
        for layer in (ref, ep):
            layer.build((None, None, D))
        rng = np.random.default_rng(0)  # the same values on every worker
        for r, e in zip(ref.weights, ep.weights):
            value = rng.normal(0, 0.3, r.shape).astype(np.float32)
            r.assign(value)
            e.assign(value[rank * local:(rank + 1) * local] if _is_expert(e) else value)
    target = rng.normal(size=(B, T, D)).astype(np.float32)
    x = np.random.default_rng(1 + rank).normal(size=(B, T, D)).astype(np.float32)

    def run(factor):
        def replica():
            ctx = tf.distribute.get_replica_context()
            out = {}
            for layer in (ref, ep):
                tokens = tf.constant(x)
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(tokens)
                    y, aux = layer(tokens, training=True, return_aux=True,
                                   capacity_factor=factor)
                    loss = tf.reduce_sum(y * target) / (B * T * world)
                variables = layer.trainable_variables
                grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
                # the reference sums every worker's gradients of all E experts
                experts = [g for v, g in zip(variables, grads) if _is_expert(v)]
                out[layer.name] = {
                    "y": y, "loss": ctx.all_reduce(SUM, loss),
                    "dropped": ctx.all_reduce(SUM, aux["dropped"]),
                    "experts": experts if layer is ep else ctx.all_reduce(SUM, experts),
                    "others": ctx.all_reduce(SUM, [g for v, g in zip(variables, grads)
                                                   if not _is_expert(v)]),
                    "tokens": tape.gradient(loss, tokens)}  # this worker's own
            return out

        out = tf.function(lambda: strategy.run(replica), autograph=False)()
        out = tf.nest.map_structure(lambda t: strategy.experimental_local_results(t)[0], out)
        a, b = out["ref"], out["ep"]
        mine = [g[rank * local:(rank + 1) * local] for g in a["experts"]]
        diff = lambda u, v: max(float(tf.reduce_max(tf.abs(p - q)))  # noqa: E731
                                for p, q in zip(tf.nest.flatten(u), tf.nest.flatten(v)))
        scale = lambda u: max(float(tf.reduce_max(tf.abs(p))) for p in u)  # noqa: E731
        return {"factor": factor, "rank": rank, "loss_ref": float(a["loss"]),
                "loss_ep": float(b["loss"]), "y": diff(a["y"], b["y"]),
                "expert_grads": diff(mine, b["experts"]), "expert_grad_scale": scale(mine),
                "other_grads": diff(a["others"], b["others"]),
                "other_grad_scale": scale(a["others"]),
                "token_grads": diff(a["tokens"], b["tokens"]),
                "dropped_ref": float(a["dropped"]), "dropped_ep": float(b["dropped"]),
                "expert_elements": sum(v.shape.num_elements() for v in ep.weights
                                       if _is_expert(v)),
                "stack_elements": sum(v.shape.num_elements() for v in ref.weights
                                      if _is_expert(v)),
                "experts_mirrored": any(_mirrored(v) for v in ep.weights if _is_expert(v)),
                "others_mirrored": all(_mirrored(v) for v in ep.weights if not _is_expert(v))}

    for factor in (0.0, 0.75):  # dropless, and a capacity that drops pairs
        print("expert parallel check: " + json.dumps(run(factor)), flush=True)


if __name__ == "__main__":
    main()
