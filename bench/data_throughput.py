"""Data engine throughput: prepare (documents/s, tokens/s), the input pipeline's tokens/s,
and the tokens/s one training step consumes; prints the pipeline / training ratio.

    python bench/data_throughput.py [--batches=200] [--steps=20] [--skip_sp]

Figures only (no pass/fail). Every part runs alone on this machine (the pipeline
is measured without a model consuming it), so on a shared CPU the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

BATCH, SEQ_LEN = 8, 256
# The training step is measured with the architecture issue's benchmark config
# (bench/train_throughput.py): hidden 256, 4 layers (first dense), 8 heads, MLA (q_lora
# 128, kv_lora 64, nope 32, rope 16, v 32), dense MLP 768, 16 routed experts of width 128
# + 1 shared, top-2, 4 groups / top-2 groups, vocab 512, batch 8 x 256.
BENCH_MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, max_position_embeddings=SEQ_LEN, attention_type="mla",
                   q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                   v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
                   moe_intermediate_size=128, n_group=4, topk_group=2, first_k_dense_replace=1)


def bench_prepare(out_root: str, skip_sp: bool) -> str:
    from deepseek_tf.config import DataConfig, TokenizerConfig
    from deepseek_tf.data.prepare import prepare

    runs = [("embedded corpus, byte tokenizer (defaults)", DataConfig(), TokenizerConfig()),
            ("+ near dedup 0.8", DataConfig(dedup_threshold=0.8), TokenizerConfig())]
    if not skip_sp:
        runs.append(("SentencePiece 8000 (training included)", DataConfig(),
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


def _sft_dir(out_root: str) -> str:
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
    prepare(DataConfig(inputs=path, format="alpaca", seq_len=SEQ_LEN), out, log=lambda *_: 0,
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


def bench_train_step(steps: int, jit: bool) -> float:
    import keras
    import tensorflow as tf

    from deepseek_tf.config import ModelConfig, OptimConfig, TrainConfig
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.train.optimizer import make_optimizer
    from deepseek_tf.train.step import make_train_step

    keras.utils.set_random_seed(0)
    model = DeepSeekCausalLM(ModelConfig(**BENCH_MODEL))
    tcfg = TrainConfig(batch_size=BATCH, jit_compile=jit)
    opt = make_optimizer(OptimConfig(), 1000, model)
    step = make_train_step(model, opt, tf.distribute.get_strategy(), tcfg, OptimConfig())
    ids = tf.random.stateless_uniform([1, BATCH, SEQ_LEN + 1], [0, 1], maxval=256, dtype=tf.int32)
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:],
             "segment_ids": tf.ones([1, BATCH, SEQ_LEN], tf.int32),
             "positions": tf.broadcast_to(tf.range(SEQ_LEN), [1, BATCH, SEQ_LEN]),
             "loss_mask": tf.ones([1, BATCH, SEQ_LEN])}
    it = iter(tf.data.Dataset.from_tensors(batch).repeat())
    for _ in range(3):
        float(step(it)["loss"])  # compile and warm up
    t0 = time.time()
    for _ in range(steps):
        out = step(it)
    float(out["loss"])
    return steps * BATCH * SEQ_LEN / (time.time() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--skip_sp", action="store_true", help="skip the SentencePiece run")
    args = parser.parse_args()
    from common import cpu_summary
    print(f"machine: {cpu_summary()}")
    root = tempfile.mkdtemp(prefix="data-bench-")
    try:
        data_dir = bench_prepare(root, args.skip_sp)
        sft_dir = _sft_dir(root)
        pipe = bench_pipeline(data_dir, args.batches)
        pipe_window = bench_pipeline(data_dir, args.batches, packing="window", stride=64)
        pipe_aug = bench_pipeline(data_dir, args.batches, augment="span")
        pipe_sft = bench_pipeline(sft_dir, args.batches)
        print(f"pipeline (read, parse, pack, shuffle, batch; {BATCH} x {SEQ_LEN}): "
              f"pretraining pack {pipe:,.0f} tokens/s | sliding windows {pipe_window:,.0f} | "
              f"pack + span masking {pipe_aug:,.0f} | SFT whole-sample pack {pipe_sft:,.0f}")
        shape = ", ".join(f"{k}={v}" for k, v in BENCH_MODEL.items())
        train = {jit: bench_train_step(args.steps, jit) for jit in (False, True)}
        print(f"training step ({shape}; batch {BATCH} x {SEQ_LEN}): "
              f"{train[False]:,.0f} tokens/s without XLA, {train[True]:,.0f} tokens/s with XLA")
        fastest = max(train.values())
        slowest_pipe = min(pipe, pipe_window, pipe_aug, pipe_sft)
        print(f"pipeline / training: {pipe / fastest:.1f}x (pretraining pack), "
              f"{slowest_pipe / fastest:.1f}x (slowest pipeline variant) vs the faster "
              f"training step; target >= 20x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
