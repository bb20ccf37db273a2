"""Data engine throughput: prepare (documents/s, tokens/s), the input pipeline's tokens/s,
and the tokens/s one training step consumes; prints the pipeline / training ratio.

    python bench/data_throughput.py [--batches=200] [--steps=20] [--skip_sp]

Figures only (no pass/fail). Every part runs alone on this machine (the pipeline
is measured without a model consuming it), so on a shared CPU the figures are noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

BATCH, SEQ_LEN = 8, 256


def bench_prepare(out_root: str, skip_sp: bool, max_samples: int = 0) -> str:
    from deepseek_tf.config import DataConfig, TokenizerConfig
    from deepseek_tf.data.prepare import prepare

    data = DataConfig(max_samples=max_samples)
    runs = [("embedded corpus, byte tokenizer (defaults)", data, TokenizerConfig()),
            ("+ near dedup 0.8", data.replace(dedup_threshold=0.8), TokenizerConfig())]
    if not skip_sp:
        runs.append(("SentencePiece 8000 (training included)", data,
                     TokenizerConfig(type="sentencepiece", vocab_size=8000)))
    first = ""
    for i, (name, cfg, tcfg) in enumerate(runs):
        out = os.path.join(out_root, f"prepare{i}")
        lines = []
        t0 = time.time()
        meta = prepare(cfg, out, tcfg, log=lines.append, progress=False)
        dt = time.time() - t0
        c = meta["report"]["counts"]
        print(f"prepare [{name}]: {c['documents_in'] / dt:,.0f} documents/s, "
              f"{c['tokens_out'] / dt:,.0f} tokens/s ({c['documents_in']} documents, "
              f"{c['tokens_out']:,} tokens, {dt:.1f}s)")
        if i < 2:
            print("\n".join(lines[:-1]))
        first = first or out
    return first


def _sft_dir(out_root: str, max_samples: int = 0) -> str:
    """SFT samples cut from the embedded corpus (prompt = a chunk, answer = the next)."""
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.corpus import stdlib_documents
    from deepseek_tf.data.prepare import prepare

    path = os.path.join(out_root, "sft.jsonl")
    with open(path, "w") as f:
        for d in stdlib_documents():
            text = d.data.decode("utf-8", "replace")
            for lo in range(0, min(len(text), 4000), 400):
                f.write(json.dumps({"instruction": text[lo:lo + 150],
                                    "output": text[lo + 150:lo + 240]}) + "\n")
    out = os.path.join(out_root, "sft")
    prepare(DataConfig(inputs=path, format="alpaca", seq_len=SEQ_LEN, max_samples=max_samples), out, log=lambda *_: 0,
            progress=False)
    return out


def bench_pipeline(data_dir: str, batches: int, **overrides) -> float:
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.pipeline import make_dataset

    cfg = DataConfig(seq_len=SEQ_LEN, **overrides)
    it = iter(make_dataset(cfg, data_dir, "train", BATCH, seed=0, accum_steps=1))
    for _ in range(20):  # warm up: fill the shuffle buffer, autotune
        next(it)
    t0 = time.time()
    for _ in range(batches):
        next(it)
    return batches * BATCH * SEQ_LEN / (time.time() - t0)


def bench_train_step(steps: int, jit: bool, smoke: bool) -> float:
    """Tokens/s of the trainer's step on the issue-3 benchmark config (median of `steps`)."""
    cfg, batch, seq = common.bench_config(smoke)
    run = common.train_step_runner(cfg, batch, seq, jit)
    return batch * seq / common.stats(common.time_calls(run, steps, warmup=3))[1]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    p.add_argument("--steps", type=int, default=20, help="training steps timed")
    p.add_argument("--skip_sp", action="store_true", help="skip the SentencePiece run")
    args = common.start(p, argv)
    max_samples = 0
    if args.smoke:
        args.batches, args.steps, args.skip_sp, max_samples = 5, 1, True, 40
    root = tempfile.mkdtemp(prefix="data-bench-")
    try:
        data_dir = bench_prepare(root, args.skip_sp, max_samples)
        sft_dir = _sft_dir(root, max_samples)
        pipe = bench_pipeline(data_dir, args.batches)
        pipe_window = bench_pipeline(data_dir, args.batches, packing="window", stride=64)
        pipe_aug = bench_pipeline(data_dir, args.batches, augment="span")
        pipe_sft = bench_pipeline(sft_dir, args.batches)
        print(f"pipeline (read, parse, pack, shuffle, batch; {BATCH} x {SEQ_LEN}): "
              f"pretraining pack {pipe:,.0f} tokens/s | sliding windows {pipe_window:,.0f} | "
              f"pack + span masking {pipe_aug:,.0f} | SFT whole-sample pack {pipe_sft:,.0f}")
        modes = (False,) if args.smoke else (False, True)  # smoke: no compile
        train = {jit: bench_train_step(args.steps, jit, args.smoke) for jit in modes}
        print(f"training step ({'smoke' if args.smoke else 'issue-3'} config, bench/common.py): "
              + ", ".join(f"{v:,.0f} tokens/s {'with' if jit else 'without'} XLA"
                          for jit, v in train.items()))
        fastest = max(train.values())
        slowest_pipe = min(pipe, pipe_window, pipe_aug, pipe_sft)
        print(f"pipeline / training: {pipe / fastest:.1f}x (pretraining pack), "
              f"{slowest_pipe / fastest:.1f}x (slowest pipeline variant) vs the faster "
              f"training step; target >= 20x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
