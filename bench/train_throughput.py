"""Training throughput and MFU of a DeepSeek-V3-style model per precision, with and
without XLA.

    python bench/train_throughput.py [--config=issue3|matmul] [--steps=8]
                                     [--precisions=float32,mixed_bfloat16]

`--config=issue3` (bench/common.py): hidden 256, 4 layers (first dense), 8 heads,
q_lora 128, kv_lora 64, nope 32, rope 16, v 32, dense MLP 768, 16 routed experts of
width 128 + 1 shared, top-2, 4 groups / top-2 groups, vocab 512, batch 8 x 256 tokens.
`--config=matmul`, a matmul-bound model: hidden 1024, 4 layers, 16 heads, q_lora 512,
kv_lora 256, nope 64, rope 32, v 64, dense MLP 2816, 16 routed experts of width 1024 + 1
shared, top-2, batch 4 x 512. MFU = model FLOPs (`deepseek_tf.params.flops_per_token`: 6
x active matmul weights + attention) per second / the matmul peak of the mode's compute
dtype (float32, or bfloat16 for `mixed_bfloat16`), each measured in this process (2048 x
2048 matmuls, the best of plain TF and XLA). The step is the trainer's (`make_train_step`:
forward, backward, AdamW, router-bias update); the figures are min / median / max over
the timed steps, and the last line is the best bfloat16 median over the best float32
one.
"""

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

from deepseek_tf.params import count_parameters, flops_per_token  # noqa: E402

COMPUTE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--config", choices=common.CONFIGS, default="issue3")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    args = common.start(p, argv)
    if args.smoke:
        args.steps = 1
    cfg, batch, seq = common.bench_config(args.smoke, args.config)
    precisions = args.precisions.split(",")
    params = count_parameters(cfg)
    fpt = flops_per_token(cfg, seq)
    n = 256 if args.smoke else 2048
    peaks = {prec: common.matmul_peak(n, dtype=COMPUTE[prec]) for prec in precisions}
    print(f"model ({args.config}): {params['total']:,} parameters, {params['active']:,} "
          f"active per token; {fpt / 1e6:.1f} MFLOP per token (train); batch {batch} x {seq}")
    print("measured matmul peaks: " + ", ".join(
        f"{COMPUTE[prec]} {peak / 1e9:.1f} GFLOP/s" for prec, peak in peaks.items()))
    rows = {}
    for prec in precisions:
        for jit in (False, True):
            mode = f"{prec} {'XLA' if jit else 'no XLA'}"
            run = common.train_step_runner(cfg, batch, seq, jit, prec)
            first = common.time_calls(run, 1)[0]
            rows[mode] = [batch * seq / t for t in common.time_calls(run, args.steps,
                                                                      warmup=1)]
            print(f"{mode}: first step incl. tracing/compile {first:.1f} s; dropped "
                  f"{100 * float(run.out['dropped_frac'].numpy().mean()):.1f}% of the "
                  f"expert assignments")
            del run
            gc.collect()
    common.print_stats("mode", rows, "tokens/s")
    best = {}
    for mode, tps in rows.items():
        prec = mode.split()[0]
        median = common.stats(tps)[1]
        best[prec] = max(best.get(prec, 0.0), median)
        other = "" if prec == precisions[0] else (
            f", {100 * median * fpt / peaks[precisions[0]]:.1f}% of the "
            f"{COMPUTE[precisions[0]]} one")
        print(f"{mode}: MFU {100 * median * fpt / peaks[prec]:.1f}% of the {COMPUTE[prec]} "
              f"peak{other} (median)")
    if "float32" in best and "mixed_bfloat16" in best:
        print(f"bfloat16 / float32 step, best modes: "
              f"{best['mixed_bfloat16'] / best['float32']:.2f}x")


if __name__ == "__main__":
    main()
