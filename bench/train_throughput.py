"""Training throughput and MFU of a small DeepSeek-V3-style model, with and without XLA.

    python bench/train_throughput.py [--steps=8]

Config (issue 3): hidden 256, 4 layers (first dense), 8 heads, q_lora 128, kv_lora 64,
nope 32, rope 16, v 32, dense MLP 768, 16 routed experts of width 128 + 1 shared,
top-2, 4 groups / top-2 groups, vocab 512, batch 8 x 256 tokens. MFU = model FLOPs
(`deepseek_tf.params.flops_per_token`: 6 x active matmul weights + attention) per
second / the float32 matmul peak measured in this process. The step is the trainer's
(`make_train_step`: forward, backward, AdamW, router-bias update).
"""

import argparse

from common import matmul_peak, time_train_step

from deepseek_tf.config import ModelConfig
from deepseek_tf.params import count_parameters, flops_per_token

CONFIG = ModelConfig(
    vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    intermediate_size=768, max_position_embeddings=256, attention_type="mla", q_lora_rank=128,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    n_group=4, topk_group=2, first_k_dense_replace=1, capacity_factor=1.25)
BATCH, SEQ = 8, 256


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from common import cpu_summary
    print(f"machine: {cpu_summary()}")
    p = count_parameters(CONFIG)
    fpt = flops_per_token(CONFIG, SEQ)
    peak = matmul_peak()
    print(f"model: {p['total']:,} parameters, {p['active']:,} active per token; "
          f"{fpt / 1e6:.1f} MFLOP per token (train)")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    for jit in (False, True):
        sec, first, out = time_train_step(CONFIG, BATCH, SEQ, jit, steps=args.steps)
        tps = BATCH * SEQ / sec
        print(f"{'XLA   ' if jit else 'no XLA'}: {sec * 1e3:8.1f} ms/step  {tps:9,.0f} tokens/s  "
              f"MFU {100 * tps * fpt / peak:5.1f}%  (first step incl. tracing/compile "
              f"{first:.1f} s; dropped {100 * float(out['dropped_frac'].numpy().mean()):.1f}%)")


if __name__ == "__main__":
    main()
