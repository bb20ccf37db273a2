"""Peak memory and step time of a training step with gradient checkpointing on and off.

    python bench/remat_memory.py            # 8 layers, seq 1024: none vs block vs attention
    python bench/remat_memory.py --modes=none,block,mlp,attention --jit_compile

Every mode runs in a fresh process with TensorFlow's BFC allocator on the CPU
(`TF_CPU_ALLOCATOR_USE_BFC=true`), whose statistics count every tensor byte. After a
warm-up step (tracing), the peak is reset; `--steps` steps of the real
`make_train_step` follow, and the figure is their peak tensor memory above what was
allocated before them (activations, gradients and temporaries of one step), with
the median step time. Step times are noisy on a shared machine: compare ratios, and
re-run on a quiet one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)


def child(spec: dict) -> dict:
    """One mode, in its own process: {"remat", "peak_mb", "step_s"}."""
    import tensorflow as tf

    from deepseek_tf.config import ModelConfig

    h = spec["hidden_size"]
    cfg = ModelConfig(vocab_size=320, hidden_size=h, intermediate_size=h * 11 // 4,
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      max_position_embeddings=spec["seq_len"])
    run = common.train_step_runner(cfg, spec["batch_size"], spec["seq_len"],
                                   spec["jit_compile"], remat=spec["remat"])
    run()  # warm-up: trace, compile
    tf.config.experimental.reset_memory_stats("CPU:0")
    base = tf.config.experimental.get_memory_info("CPU:0")["current"]
    times = common.time_calls(run, spec["steps"])
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return {"remat": spec["remat"], "peak_mb": (peak - base) / 2 ** 20,
            "step_s": common.stats(times)[1]}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--modes", default="none,block,attention")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--jit_compile", action="store_true")
    args = common.start(p, argv)
    if common.run_as_side(args, {"child": child}):
        return
    if args.smoke:
        args.modes, args.layers, args.seq_len, args.hidden_size, args.batch_size, args.steps = (
            "none,block", 1, 64, 64, 2, 1)
    print(f"model: {args.layers} layers x {args.hidden_size}, {args.heads} heads; batch "
          f"{args.batch_size} x seq {args.seq_len}; XLA {'on' if args.jit_compile else 'off'}; "
          f"median of {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            spec = dict(vars(args), remat=mode)
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(spec, f)
            rows.append(common.run_side([__file__, "--side=child", f"--spec={tmp}/spec.json"],
                                        {"TF_CPU_ALLOCATOR_USE_BFC": "true"}))
            r = rows[-1]
            print(f"remat={r['remat']:<9} peak step memory {r['peak_mb']:8.1f} MB   "
                  f"step {r['step_s']:.3f} s", flush=True)
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['remat']} / {base['remat']}: memory {r['peak_mb'] / base['peak_mb']:.2f}x, "
              f"step time {r['step_s'] / base['step_s']:.2f}x "
              f"(targets: <= 0.55x memory at <= 1.25x time)")


if __name__ == "__main__":
    main()
