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

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> dict:
    """One mode: returns {"remat", "peak_mb", "step_s"}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # allocator statistics on the CPU
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.config import ModelConfig, OptimConfig, TrainConfig
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.train.optimizer import make_optimizer
    from deepseek_tf.train.step import make_train_step

    cfg = ModelConfig(vocab_size=320, hidden_size=args.hidden_size,
                      intermediate_size=args.hidden_size * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      max_position_embeddings=args.seq_len)
    tcfg = TrainConfig(batch_size=args.batch_size, remat=args.remat,
                       jit_compile=args.jit_compile)
    model = DeepSeekCausalLM(cfg, remat=args.remat)
    optimizer = make_optimizer(OptimConfig(warmup_steps=0), 1000, model)
    shape = (1, args.batch_size, args.seq_len)  # (A, B, T)
    tokens = np.random.default_rng(0).integers(0, 256, shape).astype(np.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape),
             "loss_mask": np.ones(shape, np.float32)}
    it = iter(tf.data.Dataset.from_tensors(batch).repeat())
    step = make_train_step(model, optimizer, tf.distribute.get_strategy(), tcfg, OptimConfig())
    float(step(it)["loss"])  # warm-up: trace, compile
    tf.config.experimental.reset_memory_stats("CPU:0")
    base = tf.config.experimental.get_memory_info("CPU:0")["current"]
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(step(it)["loss"])
        times.append(time.perf_counter() - t)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return {"remat": args.remat, "peak_mb": (peak - base) / 2 ** 20,
            "step_s": statistics.median(times)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="none,block,attention")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--jit_compile", action="store_true")
    p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from common import cpu_summary
    print(f"machine: {cpu_summary()}")
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    print(f"model: {args.layers} layers x {args.hidden_size}, {args.heads} heads; batch "
          f"{args.batch_size} x seq {args.seq_len}; XLA {'on' if args.jit_compile else 'off'}; "
          f"median of {args.steps} steps")
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", f"--remat={mode}"] + [
            a for a in sys.argv[1:] if not a.startswith("--modes")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.split("RESULT ", 1)[1]))
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
