"""ZeRO-1 / ZeRO-2 (`--train.shard_optimizer`) vs plain MultiWorkerMirroredStrategy:
optimizer and gradient bytes per worker at W = 1, 2, 4 workers, step time at W = 2; and
expert parallelism (`--model.expert_parallel=W`), alone and with zero2, vs the replicated
MoE: routed-expert weights, optimizer and gradient bytes per worker at W = 2 and 4,
tokens/s at W = 2.

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
(top-2, width hidden / 2, one shared expert); the replicated, expert-parallel and
expert-parallel + zero2 runs take turns at W = 2 (the other counts: bytes only, 2 steps).
Per worker: its routed-expert weights (from the log line each run prints), its AdamW
moments as saved (the replicated weights' in the main checkpoint or its ZeRO shard, and
its experts' own), and its summed gradients (the replicated weights' as above, plus its
own experts', which are not all-reduced).
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
#: the MoE comparison's layouts: name -> (expert parallel, --train.shard_optimizer)
LAYOUTS = {"replicated": (False, "none"), "expert parallel": (True, "none"),
           "expert parallel + zero2": (True, "zero2")}


def run(workers: int, mode: str, data_dir: str, workdir: str, args, steps: int) -> dict:
    """One launcher run: {"params", "optimizer" (bytes per worker), "rates"}."""
    from deepseek_tf.train.logger import read_log

    out = common.launch_small_run(workers, data_dir, workdir, args, steps,
                                  (f"--train.shard_optimizer={mode}",))
    return {"params": _params(out), "optimizer": optimizer_bytes(workdir, workers, steps),
            "rates": _rates(workdir)}


def _params(out: str) -> int:
    """The trainable parameters a worker holds, from the run's log."""
    return int(re.search(r"trainable params: ([\d,]+)", out).group(1).replace(",", ""))


def _rates(workdir: str) -> list[float]:
    """The chief's tokens/s per log interval, after the first (tracing)."""
    from deepseek_tf.train.logger import read_log

    return [r["tokens_per_sec"] for r in read_log(workdir) if r["kind"] == "train"][1:]


def expert_run(workers: int, layout: str, data_dir: str, workdir: str, args,
               steps: int) -> dict:
    """One launcher run of the MoE model in `layout` (LAYOUTS): {"rates", "experts"
    (routed-expert weights per worker), "replicated" (the other weights), "optimizer"
    (moment bytes of each worker), "mode"}."""
    ep, mode = LAYOUTS[layout]
    moe = (f"--model.n_routed_experts={args.experts}", "--model.num_experts_per_tok=2",
           f"--model.moe_intermediate_size={args.hidden_size // 2}",
           "--model.n_shared_experts=1", f"--model.expert_parallel={workers if ep else 1}",
           f"--train.shard_optimizer={mode}")
    out = common.launch_small_run(workers, data_dir, workdir, args, steps, moe)
    held = re.search(r"this worker holds ([\d,]+) of", out)
    total = args.layers * args.experts * 3 * args.hidden_size * (args.hidden_size // 2)
    experts = int(held.group(1).replace(",", "")) if held else total
    return {"rates": _rates(workdir), "experts": experts, "mode": mode,
            "replicated": _params(out) - experts,
            "optimizer": optimizer_bytes(workdir, workers, steps)}


def optimizer_bytes(workdir: str, workers: int, step: int) -> list[int]:
    """Bytes of the AdamW moments each worker holds, from the saved checkpoints: those in
    the main checkpoint (which every worker holds; none when ZeRO shards them) and those
    in the worker's own (its ZeRO shard, its experts' moments)."""
    import tensorflow as tf

    def floats(path, prefixes):
        reader = tf.train.load_checkpoint(path)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        return sum(dtypes[k].size * max(1, int(tf.TensorShape(s).num_elements()))
                   for k, s in shapes.items()
                   if k.startswith(prefixes) and dtypes[k].is_floating and len(s) > 0)

    directory = os.path.join(workdir, "checkpoints")
    shared = floats(os.path.join(directory, f"ckpt-{step}"), ("optimizer/_variables/",))
    if workers == 1:
        return [shared]
    return [shared + floats(os.path.join(directory, f"data-worker-{w}", f"ckpt-{step}"),
                            ("optimizer_shard/", "experts/m/", "experts/v/"))
            for w in range(workers)]


def moe_bytes(res: dict, workers: int) -> tuple[int, int, int]:
    """(routed-expert weight, moment, summed-gradient) bytes per worker of an
    `expert_run`: the summed gradients of the replicated weights (all-reduced, or the
    zero2 shard) and of its experts (all-reduced with the rest when replicated, its own
    otherwise)."""
    from deepseek_tf.train.sharding import summed_gradient_bytes

    grads = summed_gradient_bytes(res["replicated"], workers, res["mode"]) + 4 * res["experts"]
    return 4 * res["experts"], max(res["optimizer"]), grads


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
    moe, moe_rates = {}, {name: [] for name in LAYOUTS}
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
        for r in range(args.rounds if args.experts else 0):  # the MoE layouts, in turns
            for i, name in enumerate(LAYOUTS):
                moe[(2, name)] = expert_run(2, name, data_dir, f"{tmp}/moe{i}-{r}", args,
                                            args.steps)
                moe_rates[name] += moe[(2, name)]["rates"]
        for w in (w for w in workers if w > 2 and args.experts):  # bytes only (2 steps)
            for i, name in enumerate(LAYOUTS):
                moe[(w, name)] = expert_run(w, name, data_dir, f"{tmp}/moe{i}-w{w}", args, 2)
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
        print_moe(args, moe, moe_rates)


def print_moe(args, moe: dict, rates: dict) -> None:
    """The MoE comparison: bytes per worker of each layout and count, W = 2 tokens/s."""
    held = {name: moe[(2, name)]["experts"] for name in LAYOUTS}
    ep = held["expert parallel"]
    print(f"MoE: {args.experts} routed experts per layer, top-2, width "
          f"{args.hidden_size // 2}, 1 shared; routed-expert weights per worker at W = 2: "
          f"replicated {held['replicated']:,}, expert parallel {ep:,} "
          f"({ep / held['replicated']:.3f}x); other weights (replicated everywhere): "
          f"{moe[(2, 'replicated')]['replicated']:,}")
    print(f"{'W':>2} {'MoE layout':<24} {'experts MiB':>11} {'moments MiB':>11} "
          f"{'gradients MiB':>13} {'together':>9} {'x replicated':>12}")
    for (w, name), res in sorted(moe.items(), key=lambda kv: (kv[0][0],
                                                              list(LAYOUTS).index(kv[0][1]))):
        sizes = moe_bytes(res, w)
        plain = sum(moe_bytes(moe[(w, "replicated")], w))
        print(f"{w:>2} {name:<24} " + " ".join(
            f"{b / 2**20:>{n}.3f}" for b, n in zip(sizes, (11, 11, 13))) +
            f" {sum(sizes) / 2**20:>9.3f} {sum(sizes) / plain:>12.3f}")
    common.print_stats("W = 2 MoE step", rates, "tokens/s per log interval")
    for name in list(LAYOUTS)[1:]:
        print(f"{name} / replicated tokens/s at W = 2: "
              f"{common.stats(rates[name])[1] / common.stats(rates['replicated'])[1]:.2f}x "
              f"(ratio of medians)")


if __name__ == "__main__":
    main()
