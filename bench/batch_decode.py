"""Batched decode: tokens/s of the SavedModel's `generate_ids` at batch 1, 2, 4, 8, 16.

    python bench/batch_decode.py [--models=issue3,tiny] [--jit_compile] [--rounds=3]
                                 [--runs=3] [--new_tokens=32] [--smoke]

Per model (bench/decode.py's: the issue-3 config, MLA + 16 experts, and the tiny preset;
random weights, seed 0) the SavedModel is exported as `export --format=saved_model` does
by default (`--jit_compile`: with XLA-compiled steps) and loaded back. For each batch
size B, B different prompts of 16 tokens decode greedily; decode tokens/s = B x
(N - 1) / (time of N new tokens - time of 1) with N = --new_tokens, the fastest of --runs
runs in each round; the batch sizes take turns round after round. Prints min / median /
max per batch size and each median's ratio to batch 1's (the serving target: batch 8 >=
4x batch 1). Only our SavedModel runs: no reference side.
"""

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)
import decode  # noqa: E402

PROMPT = 16
BATCHES = (1, 2, 4, 8, 16)


def batch_rates(call, batches, new: int, runs: int, rounds: int) -> dict:
    """{B: [decode tokens/s per round]} of `call(prompts (B, PROMPT), n)`."""
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, 256, size=(b, PROMPT)).astype(np.int32) for b in batches}
    for b in batches:  # warm-up: one trace per batch size
        call(prompts[b], new)
    rates = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            t1 = min(common.time_calls(lambda: call(prompts[b], 1), runs))
            tn = min(common.time_calls(lambda: call(prompts[b], new), runs))
            rates[b].append(b * (new - 1) / max(tn - t1, 1e-9))
    return rates


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--models", default="issue3,tiny")
    p.add_argument("--jit_compile", action="store_true", help="export with XLA steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch and round")
    p.add_argument("--new_tokens", type=int, default=32)
    args = common.start(p, argv)
    batches = BATCHES
    if args.smoke:
        args.models, args.rounds, args.runs, args.new_tokens, batches = "smoke", 1, 1, 4, (1, 2)
    side = "saved_model_xla" if args.jit_compile else "saved_model"
    tmp = tempfile.mkdtemp(prefix="batch-decode-bench-")
    try:
        names = args.models.split(",")
        paths, _ = decode.prepare(names, PROMPT + args.new_tokens, tmp, (side,))
        for name in names:
            cfg = decode.MODELS[name]
            rates = batch_rates(decode._signature_call(paths[name]["sm_xla" if args.jit_compile
                                                                  else "sm"]),
                                batches, args.new_tokens, args.runs, args.rounds)
            print(f"\n{name}: {cfg.attention_type}, {cfg.num_hidden_layers} layers, hidden "
                  f"{cfg.hidden_size}" + (f", {cfg.n_routed_experts} experts"
                                          if cfg.n_routed_experts else "")
                  + f"; SavedModel {'with' if args.jit_compile else 'without'} XLA, "
                  f"prompts of {PROMPT}, {args.new_tokens} new tokens")
            common.print_stats("decode tokens/s", {f"batch {b}": v for b, v in rates.items()},
                               "tokens/s", "{:,.0f}")
            base = statistics.median(rates[1])
            print("batch curve (median / batch 1's): " + ", ".join(
                f"{b}: {statistics.median(rates[b]) / base:.2f}x" for b in batches))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
