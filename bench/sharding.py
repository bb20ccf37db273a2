"""ZeRO-1 / ZeRO-2 (`--train.shard_optimizer`) vs plain MultiWorkerMirroredStrategy:
optimizer and gradient bytes per worker at W = 1, 2, 4 workers, step time at W = 2; and
expert parallelism (`--model.expert_parallel=2`) vs the replicated MoE: tokens/s and
routed-expert weights per worker at W = 2.

    python bench/sharding.py                   # W = 1, 2, 4; 2 rounds of the W = 2 timing
    python bench/sharding.py --workers=1,2 --hidden_size=512

Every run goes through `python -m deepseek_tf.launch --cpus_per_worker=1` (W = 4 on a
2-core machine shares the cores: its runs count bytes, not time). Per worker:
- optimizer bytes: the AdamW moments each worker saved, read back from its checkpoint
  (plain: every moment in the main checkpoint, which every worker holds; zero1/2: the
  worker's shard in `checkpoints/data-worker-<i>/`);
- summed-gradient bytes: the tensor the step holds after reducing the gradients (plain
  and zero1: the all-reduced gradients, 4 N bytes; zero2: its reduce-scattered shard,
  4 ceil(N / W)). The local gradients of the backward pass are full-size in every mode.
Step time: the chief's logged tokens/s per log interval after the first (tracing), the
modes taking turns round after round; target ratio <= 1.3x plain at W = 2. Expert
parallel: the same model with every MLP a DeepSeekMoE of `--experts` routed experts
(top-2, width hidden / 2, one shared expert), replicated and expert-parallel runs taking
turns; weights per worker from the log line each run prints.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

MODES = ("none", "zero1", "zero2")


def run(workers: int, mode: str, data_dir: str, workdir: str, args, steps: int) -> dict:
    """One launcher run: {"params", "optimizer" (bytes per worker), "rates"}."""
    from deepseek_tf.train.logger import read_log

    out = common.launch_small_run(workers, data_dir, workdir, args, steps,
                                  (f"--train.shard_optimizer={mode}",))
    params = int(re.search(r"trainable params: ([\d,]+)", out).group(1).replace(",", ""))
    rates = [r["tokens_per_sec"] for r in read_log(workdir) if r["kind"] == "train"][1:]
    return {"params": params, "optimizer": optimizer_bytes(workdir, workers, mode, steps),
            "rates": rates}


def expert_run(ep: int, data_dir: str, workdir: str, args, steps: int) -> dict:
    """One W = 2 launcher run of the MoE model: {"rates", "experts" (routed-expert weights
    per worker)}."""
    from deepseek_tf.train.logger import read_log

    moe = (f"--model.n_routed_experts={args.experts}", "--model.num_experts_per_tok=2",
           f"--model.moe_intermediate_size={args.hidden_size // 2}",
           "--model.n_shared_experts=1", f"--model.expert_parallel={ep}")
    out = common.launch_small_run(2, data_dir, workdir, args, steps, moe)
    held = re.search(r"this worker holds ([\d,]+) of", out)
    total = args.layers * args.experts * 3 * args.hidden_size * (args.hidden_size // 2)
    return {"rates": [r["tokens_per_sec"] for r in read_log(workdir)
                      if r["kind"] == "train"][1:],
            "experts": int(held.group(1).replace(",", "")) if held else total}


def optimizer_bytes(workdir: str, workers: int, mode: str, step: int) -> list[int]:
    """Bytes of the AdamW moments each worker holds, from the saved checkpoints."""
    import tensorflow as tf

    def floats(path, prefix):
        reader = tf.train.load_checkpoint(path)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        return sum(dtypes[k].size * max(1, int(tf.TensorShape(s).num_elements()))
                   for k, s in shapes.items()
                   if k.startswith(prefix) and dtypes[k].is_floating and len(s) > 0)

    main = os.path.join(workdir, "checkpoints", f"ckpt-{step}")
    if mode == "none" or workers == 1:
        return [floats(main, "optimizer/_variables/")] * workers  # every worker: all
    return [floats(os.path.join(workdir, "checkpoints", f"data-worker-{w}", f"ckpt-{step}"),
                   "optimizer_shard/") for w in range(workers)]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--workers", default="1,2,4", help="worker counts to measure bytes at")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4, help="sequences per replica")
    p.add_argument("--steps", type=int, default=30, help="steps of each timed W = 2 run")
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="timed W = 2 runs per mode")
    p.add_argument("--experts", type=int, default=8,
                   help="routed experts of the expert-parallel comparison (0 = skip it)")
    args = common.start(p, argv)
    workers = [int(w) for w in args.workers.split(",")]
    modes = MODES
    if args.smoke:
        args.layers, args.hidden_size, args.seq_len, args.batch_size = 1, 64, 32, 2
        args.steps, args.log_every, args.rounds, workers, modes = 4, 1, 1, [2], ("none", "zero2")
        args.experts = min(args.experts, 4)
    if 2 not in workers:
        sys.exit("error: --workers must include 2 (the step-time comparison)")
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.prepare import prepare
    from deepseek_tf.train.sharding import summed_gradient_bytes

    tmp = tempfile.mkdtemp(prefix="sharding-bench-")
    data_dir = os.path.join(tmp, "data")
    results, rates = {}, {m: [] for m in modes}
    ep_rates, ep_experts = {1: [], 2: []}, {}
    try:
        prepare(DataConfig(seq_len=args.seq_len, max_samples=40 if args.smoke else 400,
                           val_size=10), data_dir, log=lambda *_: None)
        print(f"model: {args.layers} layers x {args.hidden_size}; {args.batch_size} x "
              f"{args.seq_len} tokens per replica; XLA off; 1 CPU per worker", flush=True)
        for r in range(args.rounds):  # W = 2, the modes taking turns: bytes and time
            for mode in modes:
                res = run(2, mode, data_dir, f"{tmp}/w2-{mode}-{r}", args, args.steps)
                results[(2, mode)] = res
                rates[mode] += res["rates"]
        for w in workers:  # the other counts: bytes only (2 steps)
            for mode in (("none",) if w == 1 else modes):
                if (w, mode) not in results:
                    results[(w, mode)] = run(w, mode, data_dir, f"{tmp}/w{w}-{mode}", args, 2)
        for r in range(args.rounds if args.experts else 0):  # expert parallel, in turns
            for ep in (1, 2):
                res = expert_run(ep, data_dir, f"{tmp}/moe-ep{ep}-{r}", args, args.steps)
                ep_rates[ep] += res["rates"]
                ep_experts[ep] = res["experts"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = results[(2, "none")]["params"]
    print(f"trainable parameters: {params:,} (AdamW moments unsharded: "
          f"{8 * params / 2**20:.2f} MiB, summed gradients {4 * params / 2**20:.2f} MiB)")
    print(f"{'W':>2} {'mode':<6} {'optimizer MiB/worker':>21} {'gradients MiB/worker':>21} "
          f"{'opt+grad':>9} {'x plain':>8} {'1/W+10%':>8}")
    for (w, mode), res in sorted(results.items()):
        opt, grad = max(res["optimizer"]), summed_gradient_bytes(res["params"], w, mode)
        plain = max(results[(w, "none")]["optimizer"]) + summed_gradient_bytes(params, w, "none")
        print(f"{w:>2} {mode:<6} {opt / 2**20:>21.3f} {grad / 2**20:>21.3f} "
              f"{(opt + grad) / 2**20:>9.3f} {(opt + grad) / plain:>8.3f} "
              f"{1 / w + 0.1:>8.3f}")
    common.print_stats("W = 2 step", rates, "tokens/s per log interval")
    none = common.stats(rates["none"])[1]
    for mode in modes[1:]:
        print(f"{mode} / none step time at W = 2: {none / common.stats(rates[mode])[1]:.2f}x "
              f"(ratio of median tokens/s; target <= 1.3x)")
    if args.experts:
        print(f"MoE: {args.experts} routed experts per layer, top-2, width "
              f"{args.hidden_size // 2}, 1 shared; routed-expert weights per worker: "
              f"replicated {ep_experts[1]:,}, expert parallel {ep_experts[2]:,} "
              f"({ep_experts[2] / ep_experts[1]:.3f}x)")
        named = {"replicated": ep_rates[1], "expert_parallel": ep_rates[2]}
        common.print_stats("W = 2 MoE step", named, "tokens/s per log interval")
        print(f"expert parallel / replicated tokens/s at W = 2: "
              f"{common.stats(ep_rates[2])[1] / common.stats(ep_rates[1])[1]:.2f}x "
              f"(ratio of medians)")


if __name__ == "__main__":
    main()
