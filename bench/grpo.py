"""GRPO's step: sampling (rollout) time vs update time, and the generator's tokens/s.

    python bench/grpo.py [--init_from=runs/sft-lora-tiny] [--steps=8] [--warmup=2]
                         [--flags=--grpo.group_size=16,...] [--smoke]

Runs `--train.stage=grpo` through the trainer's own Runner with configs/grpo-tiny.flags
(LoRA rank 16, 8 prompts x 8 samples of at most 16 tokens, seq_len 96; `--flags` adds
or overrides trainer flags, comma-separated) on the fine-tuning demo's questions
(`--data`, default: data/sft-demo/train.jsonl if present, else 2,000 generated ones).
The policy starts from `--init_from` (default: runs/sft-lora-tiny if present, else random
weights in configs/tiny.flags' shape, whose completions run the full length). Every
step is timed whole (`Runner.run_step`); the rollout part (sampling, rewards, the old and
reference log-probs) is the trainer's own `rollout_seconds`, of it `sample_seconds` the
KV-cache generator alone; update = the step minus its rollout. Prints one line per timed
step, then min / median / max over the steps. The `--warmup` steps first (tracing,
compiling) are not timed. Figures only; quote them from a quiet machine. `--smoke`: a
one-layer random model, 2 prompts x 2 samples of 4 tokens, no XLA, 2 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

PRESET = os.path.join(common.ROOT, "configs", "grpo-tiny.flags")
SMOKE_FLAGS = ["--grpo.group_size=2", "--grpo.max_new_tokens=4", "--train.batch_size=2",
               "--data.seq_len=64", "--data.val_size=2", "--train.jit_compile=false"]


def random_source(path: str, smoke: bool) -> str:
    """A workdir of random weights: configs/tiny.flags' model (`--smoke`: one small layer)."""
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.flags import experiment_from_flags
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.workdir import write_workdir

    exp = experiment_from_flags(
        common.flag_values([f"--flagfile={common.ROOT}/configs/tiny.flags"]))
    if smoke:
        exp = dataclasses.replace(exp, model=exp.model.replace(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    return write_workdir(path, DeepSeekCausalLM(exp.model), exp, ByteTokenizer())


def demo_data(path: str, n: int) -> str:
    from deepseek_tf.data.demo import make_splits, write_jsonl

    write_jsonl(path, make_splits(num_train=n, num_heldout=0, seed=0)[0])
    return path


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--init_from", default="", help="policy workdir (default: "
                   "runs/sft-lora-tiny if present, else random weights)")
    p.add_argument("--data", default="", help="prompts JSONL (default: the demo's)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--flags", default="", help="trainer flags, comma-separated")
    a = common.start(p, argv)
    from deepseek_tf.flags import resolve_experiment
    from deepseek_tf.train.loop import Runner

    steps, warmup = (2, 1) if a.smoke else (a.steps, a.warmup)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cleanup:
        default_src = os.path.join(common.ROOT, "runs", "sft-lora-tiny")
        src = a.init_from or ("" if a.smoke or not os.path.isdir(default_src) else default_src)
        src = src or random_source(os.path.join(tmp, "src"), a.smoke)
        default_data = os.path.join(common.ROOT, "data", "sft-demo", "train.jsonl")
        data = a.data or (default_data if os.path.exists(default_data) and not a.smoke
                          else demo_data(os.path.join(tmp, "prompts.jsonl"),
                                         20 if a.smoke else 2000))
        total = warmup + steps + 1  # the last step evaluates and saves: not timed
        argv = [f"--flagfile={PRESET}", f"--workdir={tmp}/run", f"--train.init_from={src}",
                f"--data.inputs={data}", f"--train.steps={total}", "--train.eval_every=0",
                f"--train.checkpoint_every={total}", f"--train.log_every={total}",
                *(SMOKE_FLAGS if a.smoke else []), *filter(None, a.flags.split(","))]
        fv = common.flag_values(argv)
        exp = resolve_experiment(fv, fv["workdir"].value)
        g, cfg = exp.grpo, exp.train
        print(f"policy: {src if a.init_from or src == default_src else 'random weights'} "
              f"({exp.model.num_hidden_layers} x {exp.model.hidden_size}, "
              f"{cfg.finetuning_type}); {cfg.batch_size} prompts x {g.group_size} samples of "
              f"<= {g.max_new_tokens} tokens, seq_len {exp.data.seq_len}, inner_steps "
              f"{g.inner_steps}, dynamic_sampling {g.dynamic_sampling}; {warmup} warm-up + "
              f"{steps} timed steps")
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own lines
            runner = Runner.begin(exp, fv["workdir"].value, lambda *_: None, cleanup)
        print(f"XLA: {runner.tcfg.jit_compile}")
        rows = []
        print(f"{'step':>5} {'step s':>8} {'rollout s':>10} {'sample s':>9} {'update s':>9} "
              f"{'tokens':>7} {'tokens/s':>9}")
        for i in range(total - 1):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                runner.run_step()
            sec = time.perf_counter() - t0
            fresh = (runner.step - 1) % g.inner_steps == 0  # this step sampled a batch
            r = json.loads(runner.objective.buffer.stats.numpy().decode()) if fresh else {}
            roll = r.get("rollout_seconds", 0.0)
            row = (sec, roll, r.get("sample_seconds", 0.0), sec - roll,
                   r.get("sample_tokens", 0), r.get("sample_tokens_per_sec", 0.0), fresh)
            if i >= warmup:
                rows.append(row)
            print(f"{runner.step:>5} {sec:>8.3f} {roll:>10.3f} {row[2]:>9.3f} {row[3]:>9.3f} "
                  f"{row[4]:>7d} {row[5]:>9,.0f}" + ("" if i >= warmup else "  (warm-up)"))
        sampled = [r for r in rows if r[6]]
        common.print_stats("per step", {"step (s)": [r[0] for r in rows],
                                        "update (s)": [r[3] for r in rows]}, "", "{:.3f}")
        common.print_stats("per rollout", {"rollout (s)": [r[1] for r in sampled],
                                           "sampling (s)": [r[2] for r in sampled]},
                           "", "{:.3f}")
        common.print_stats("generator", {"tokens/s": [r[5] for r in sampled]}, "")
        share = sum(r[1] for r in rows) / sum(r[0] for r in rows)
        print(f"rollout share of step time: {100 * share:.0f}%; median generator "
              f"{common.stats([r[5] for r in sampled])[1]:,.0f} tokens/s")


if __name__ == "__main__":
    main()
