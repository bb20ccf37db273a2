"""Our train step against transformers' DeepseekV3ForCausalLM, same model and batch.

    python bench/compare_hf.py [--config=issue3|matmul] [--rounds=3] [--steps=4]
                               [--precisions=float32,mixed_bfloat16]

`--config` (bench/common.py): issue3 (MLA + 16 routed experts of width 128, hidden 256,
8 x 256 tokens) or matmul (the same layout at hidden 1024 with experts of width 1024,
4 x 512 tokens: matmul-bound). The
method of bench/README.md: each side runs alone in its own fresh process with its
library's defaults (no thread-policy variables), the sides take turns round after round
(ours, transformers, ours, ...), and each prints min / median / max tokens/s over the
rounds (a round's figure: the median of its timed steps).
Ours (`--side=ours`, this file): the trainer's step (`make_train_step`: forward,
backward, clipping, AdamW, router bias update) in every `--precisions` x XLA off/on.
`mixed_float16` is left out by default: without XLA a CPU runs float16 matmuls on a
slow path (~80x slower); add it on GPUs or to see that.
Theirs (bench/hf_train.py): torch forward, cross entropy, backward, clipping, torch
AdamW, in float32 and with bfloat16 autocast, each eager and with the model under
`torch.compile` (`--smoke`: float32 compiled only, besides the eager two).
Also prints the ratio of the best medians and what the trainer's `auto` settings pick.
torch and transformers are test extras (`pip install -e .[parity]`, BUILD.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

HERE = os.path.dirname(os.path.abspath(__file__))
# transformers' settings in --smoke (hf_train.SETTINGS): one compile of the tiny model
# (~25 s on 2 cores) checks the torch.compile path.
SMOKE_HF = ["float32", "bf16 autocast", "float32 + torch.compile"]


def ours(spec: dict) -> dict:
    """Our side: seconds per step of every setting, and the trainer's auto choice."""
    import numpy as np
    import tensorflow as tf
    cfg, batch, seq = common.bench_config(spec["smoke"], spec["config"])
    b = dict(np.load(spec["batch"]))
    it = iter(tf.data.Dataset.from_tensors(b).repeat())
    seconds = {}
    for precision in spec["precisions"]:
        for jit in spec["jit"]:
            run = common.train_step_runner(cfg, batch, seq, jit, precision, it=it)
            name = f"{precision}{' +XLA' if jit else ''}"
            seconds[name] = common.time_calls(run, spec["steps"], spec["warmup"])
    out = {"seconds": seconds, "threads": common.tf_threads(),
           "version": f"TensorFlow {tf.__version__}"}
    if spec["auto"]:
        prec, jit, why = common.trainer_choice(cfg, batch, seq)
        out["auto"] = f"{prec}{' +XLA' if jit else ''} ({why})"
    return out


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--config", choices=common.CONFIGS, default="issue3",
                   help="issue3 or matmul (bench/common.py)")
    p.add_argument("--rounds", type=int, default=3, help="turns of each side")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    p.add_argument("--precisions", default="float32,mixed_bfloat16",
                   help="our precisions, each without and with XLA")
    p.add_argument("--keep", action="store_true", help="keep the spec files (to re-run a side)")
    args = common.start(p, argv)
    if common.run_as_side(args, {"ours": ours}):
        return
    jit = (False, True)
    if args.smoke:  # one setting, no compile (the auto choice below compiles once)
        args.rounds, args.steps, args.warmup, args.precisions = 1, 1, 1, "float32"
        jit = (False,)

    import numpy as np
    from deepseek_tf.convert.hf_config import hf_config_from_model

    cfg, batch, seq = common.bench_config(args.smoke, args.config)
    hf_cfg = hf_config_from_model(cfg.replace(rope_interleave=True))  # V3 export layout
    hf_cfg.update(dtype="float32", aux_loss_alpha=0.0, num_nextn_predict_layers=0)
    tmp = tempfile.mkdtemp(prefix="compare-hf-")
    b = common.random_batch(batch, seq, cfg.vocab_size)  # the same batch for both sides
    np.savez(os.path.join(tmp, "batch.npz"), **b)
    np.savez(os.path.join(tmp, "batch_hf.npz"), inputs=b["inputs"][0], targets=b["targets"][0])
    spec = {"smoke": args.smoke, "config": args.config, "steps": args.steps, "warmup": args.warmup,
            "precisions": args.precisions.split(","), "jit": jit, "hf_config": hf_cfg}
    ours_spec = dict(spec, batch=os.path.join(tmp, "batch.npz"), auto=False)
    specs = {"ours": ours_spec, "ours_last": dict(ours_spec, auto=True),  # + the auto choice
             "transformers": dict(spec, batch=os.path.join(tmp, "batch_hf.npz"),
                                  settings=SMOKE_HF if args.smoke else None)}
    for name, s in specs.items():
        with open(os.path.join(tmp, f"{name}.json"), "w") as f:
            json.dump(s, f)
    last = args.rounds - 1
    sides = {"deepseek_tf": lambda r: [__file__, "--side=ours", f"--spec={tmp}/ours"
                                       f"{'_last' if r == last else ''}.json"],
             "transformers": [os.path.join(HERE, "hf_train.py"),
                              f"--spec={tmp}/transformers.json"]}
    tokens = batch * seq
    print(f"config: {'smoke' if args.smoke else args.config} (bench/common.py), batch "
          f"{batch} x {seq} = {tokens:,} tokens; {args.steps} timed steps per setting and round "
          f"after {args.warmup} warm-up")
    common.print_sides({"deepseek_tf": sides["deepseek_tf"](0),
                        "transformers": sides["transformers"]})
    try:
        results = common.alternate(sides, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    summarize(results, tokens)
    print(f"the trainer's auto settings here: {results['deepseek_tf'][-1]['auto']}")


def summarize(results: dict, tokens: int) -> None:
    """Prints tokens/s per setting (min / median / max over rounds), the best of each side
    and the ratio of their medians."""
    import statistics
    print()
    common.print_side_info(results)
    rows, medians = {}, {}
    for name, rounds in results.items():
        for setting in rounds[0]["seconds"]:
            per_round = [tokens / statistics.median(r["seconds"][setting]) for r in rounds]
            rows[f"{name} {setting}"] = per_round
            medians[(name, setting)] = statistics.median(per_round)
    common.print_stats("side, setting", rows, "tokens/s")
    best = {n: max((v, s) for (side, s), v in medians.items() if side == n) for n in results}
    (o, os_), (t, ts) = best["deepseek_tf"], best["transformers"]
    print(f"best medians: deepseek_tf {o:,.0f} tokens/s ({os_}), transformers {t:,.0f} "
          f"tokens/s ({ts}): ratio {o / t:.2f}x")


if __name__ == "__main__":
    main()
