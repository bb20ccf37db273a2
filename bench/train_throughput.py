"""Training throughput and MFU of a small DeepSeek-V3-style model, with and without XLA.

    python bench/train_throughput.py [--steps=8]

The issue-3 config (bench/common.py): hidden 256, 4 layers (first dense), 8 heads,
q_lora 128, kv_lora 64, nope 32, rope 16, v 32, dense MLP 768, 16 routed experts of
width 128 + 1 shared, top-2, 4 groups / top-2 groups, vocab 512, batch 8 x 256 tokens.
MFU = model FLOPs (`deepseek_tf.params.flops_per_token`: 6 x active matmul weights +
attention) per second / the float32 matmul peak measured in this process. The step is
the trainer's (`make_train_step`: forward, backward, AdamW, router-bias update); the
figures are min / median / max over the timed steps.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

from deepseek_tf.params import count_parameters, flops_per_token  # noqa: E402


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    args = common.start(p, argv)
    if args.smoke:
        args.steps = 1
    cfg, batch, seq = common.bench_config(args.smoke)
    params = count_parameters(cfg)
    fpt = flops_per_token(cfg, seq)
    peak = common.matmul_peak(256 if args.smoke else 1024)
    print(f"model: {params['total']:,} parameters, {params['active']:,} active per token; "
          f"{fpt / 1e6:.1f} MFLOP per token (train); batch {batch} x {seq}")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    rows = {}
    for jit in (False, True):
        run = common.train_step_runner(cfg, batch, seq, jit)
        first = common.time_calls(run, 1)[0]
        rows["XLA" if jit else "no XLA"] = [batch * seq / t for t in
                                            common.time_calls(run, args.steps, warmup=1)]
        print(f"{'XLA' if jit else 'no XLA'}: first step incl. tracing/compile {first:.1f} s; "
              f"dropped {100 * float(run.out['dropped_frac'].numpy().mean()):.1f}% of the "
              f"expert assignments")
    common.print_stats("mode", rows, "tokens/s")
    for mode, tps in rows.items():
        print(f"{mode}: MFU {100 * common.stats(tps)[1] * fpt / peak:.1f}% (median)")


if __name__ == "__main__":
    main()
