"""MoE sparse-dispatch scaling: training step time with 64 vs 8 routed experts at top-2,
the same active size (target ratio <= 1.15), in the mode the trainer would pick here.

    python bench/moe_scaling.py [--steps=12] [--tokens=2048] [--seq=256] [--modes=auto]
                                [--experts=8,64]

`--modes=auto` (default) measures the precision and XLA setting that
`--train.precision=auto --train.jit_compile=auto` resolve to on this machine for the
E=8 model (train/autotune.py: the same rule and timing); `--modes=both` measures float32
with and without XLA.

Two measurements:
  layer  the DeepSeekMoE layer alone (N tokens x d 256, experts of width 128, shared
         expert, capacity factor 1.25), forward + backward;
  model  the trainer's full step on a 2-layer MLA model whose both layers are MoE
         (hidden 256, batch 8 x --seq tokens), its forward + backward alone, and its
         per-parameter part alone (global norm + fused AdamW update on fixed gradients).
What grows with E at a fixed top-k is per-parameter memory traffic, not dispatch:
E=64 has 8x the expert weights, so 8x the weight casts (mixed precision), weight
gradients written, norm and AdamW passes. At 2,048 tokens per step that is a large
share of the step; it shrinks as tokens per step grow (try --seq=1024).
The model runs take turns step by step (bench/common.py), so machine noise hits
E=8 and E=64 alike; figures are medians. For reference it also times the all-experts
einsum (every expert on every token, KerasHub style), whose cost grows with the number
of experts.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SMOKE, grad_fn_runner, interleaved_medians, parser, start,  # noqa: E402
                    time_calls, trainer_choice, train_step_runner, update_runner)

import tensorflow as tf  # noqa: E402

from deepseek_tf.config import ModelConfig  # noqa: E402
from deepseek_tf.layers.moe import DeepSeekMoE  # noqa: E402

D, F = 256, 128


def dense_all_experts(x, layer):
    """Every expert on every token, masked by the routing weights (the dense baseline)."""
    route = layer.gate(x)
    h = tf.einsum("nd,edf->enf", x, tf.cast(layer.gate_up_proj, x.dtype))
    y = tf.einsum("enf,efd->end", tf.nn.silu(h[..., :F]) * h[..., F:],
                  tf.cast(layer.down_proj, x.dtype))
    mask = tf.cast(tf.reduce_sum(tf.one_hot(route["indices"], layer.num_experts)
                                 * route["weights"][..., None], 1), x.dtype)  # (N, E)
    return tf.einsum("end,ne->nd", y, mask) + layer.shared_experts(x)


def time_layer(experts: int, tokens: int, jit: bool, dense: bool, steps: int,
               precision: str = "float32") -> float:
    from deepseek_tf.train.precision import policy_scope
    tf.keras.utils.set_random_seed(0)
    with policy_scope(precision):
        layer = DeepSeekMoE(D, experts, 2, F, n_shared_experts=1, capacity_factor=1.25,
                            n_group=1, topk_group=1)
    x = tf.cast(tf.random.normal((tokens, D)), layer.compute_dtype)
    layer(tf.reshape(x, (1, tokens, D)))

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = dense_all_experts(x, layer) if dense else layer(
                tf.reshape(x, (1, tokens, D)), training=True)
            loss = tf.reduce_sum(tf.square(tf.cast(y, tf.float32)))
        return loss, tape.gradient(loss, [x] + layer.trainable_variables)

    return statistics.median(time_calls(lambda: float(step(x)[0]), steps, warmup=1))


def model_config(experts: int, smoke: bool = False) -> ModelConfig:
    if smoke:  # the smoke model (bench/common.py): one MoE layer, tiny
        return SMOKE.replace(n_routed_experts=experts)
    return ModelConfig(vocab_size=512, hidden_size=D, num_hidden_layers=2, num_attention_heads=8,
                       intermediate_size=768, attention_type="mla", q_lora_rank=128,
                       kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=2,
                       moe_intermediate_size=F, capacity_factor=1.25)


def params(experts: int) -> int:
    from deepseek_tf.params import count_parameters
    return count_parameters(model_config(experts))["total"]


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=12, help="timed rounds")
    p.add_argument("--seq", type=int, default=256, help="model: tokens per sequence")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", default="8,64", help="the two expert counts compared")
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--skip_layer", action="store_true")
    p.add_argument("--modes", choices=("auto", "both"), default="auto")
    args = start(p, argv)
    if args.smoke:
        args.steps, args.seq, args.tokens, args.experts = 1, 32, 128, "4,8"
    lo, hi = (int(e) for e in args.experts.split(","))
    if args.smoke:  # float32 without XLA: no compile (compare_hf's smoke run covers `auto`)
        modes = [("float32", False)]
    elif args.modes == "auto":
        prec, jit, why = trainer_choice(model_config(lo), 8, args.seq)
        print(f"the trainer's choice here: {prec}, XLA {'on' if jit else 'off'} ({why})")
        modes = [(prec, jit)]
    else:
        modes = [("float32", True), ("float32", False)]
    for prec, jit in modes:
        name = ("XLA   " if jit else "no XLA") + f" {prec}"
        if not args.skip_layer:
            t8, t64 = (time_layer(e, args.tokens, jit, False, args.steps, prec) for e in (lo, hi))
            d8, d64 = (time_layer(e, args.tokens, jit, True, args.steps, prec) for e in (lo, hi))
            print(f"{name} layer  sparse: E={lo} {t8 * 1e3:7.1f} ms  E={hi} {t64 * 1e3:7.1f} ms  "
                  f"ratio {t64 / t8:.2f}   | all-experts einsum: E={lo} {d8 * 1e3:7.1f} ms  "
                  f"E={hi} {d64 * 1e3:7.1f} ms  ratio {d64 / d8:.2f}")
        if not args.skip_model:
            runners = {}
            for e in (lo, hi):
                cfg = model_config(e, args.smoke)
                runners[f"step{e}"] = train_step_runner(cfg, 8, args.seq, jit, prec)
                if not args.smoke:  # smoke: the train step alone (each runner is a trace)
                    runners[f"grad{e}"] = grad_fn_runner(cfg, 8, args.seq, jit, prec)
                    runners[f"update{e}"] = update_runner(cfg, prec)
            t = {k: v * 1e3 for k, v in
                 interleaved_medians(runners, args.steps, 1 if args.smoke else 2).items()}
            dropped = float(runners[f"step{hi}"].out["dropped_frac"].numpy().mean())
            print(f"{name} model  train step: E={lo} {t[f'step{lo}']:7.1f} ms  E={hi} "
                  f"{t[f'step{hi}']:7.1f} ms  ratio {t[f'step{hi}'] / t[f'step{lo}']:.2f}  "
                  f"(8 x {args.seq} tokens; E={hi} dropped {100 * dropped:.1f}%)")
            if args.smoke:
                continue
            print(f"{name} model  fwd+bwd:    E={lo} {t[f'grad{lo}']:7.1f} ms  E={hi} "
                  f"{t[f'grad{hi}']:7.1f} ms  ratio {t[f'grad{hi}'] / t[f'grad{lo}']:.2f}")
            print(f"{name} model  update:     E={lo} {t[f'update{lo}']:7.1f} ms  E={hi} "
                  f"{t[f'update{hi}']:7.1f} ms  (norm + AdamW alone; "
                  f"{params(lo) / 1e6:.1f}M vs {params(hi) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
