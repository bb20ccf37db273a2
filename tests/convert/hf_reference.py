"""Reference logits from Hugging Face transformers (run in a subprocess: torch never
enters the TF test process).

    python hf_reference.py build OUT_DIR     # tiny random models -> OUT_DIR/<name>/ + logits
    python hf_reference.py reload DIR...     # from_pretrained(DIR) -> DIR/reloaded.npz
    python hf_reference.py generate N DIR... # greedy generate(DIR/prompts.npy rows, N new
                                             # tokens, no EOS) -> DIR/generated.npy

`build` saves each model with save_pretrained (safetensors) and writes
OUT_DIR/reference.npz with the token batch and every model's float32 logits.
Nothing is downloaded: the models are built from configs with a fixed seed.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

SEQ, VOCAB = 20, 300  # the vocabulary covers the byte tokenizer: converted models train
MLA = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_attention_heads=4,
           num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=12, moe_intermediate_size=24, max_position_embeddings=64,
           initializer_range=0.1)
DENSE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.1)

# DeepSeek-V4: every attention type (window 6 < T; CSA entries of 4 with the indexer
# keeping 2; HCA entries of 8, so T = 20 leaves a partial tail), hash-routed then top-k
# MoE with swiglu_limit clipping, 3 hyper-connection streams.
V4 = dict(vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4,
          num_attention_heads=4, head_dim=16, partial_rotary_factor=0.5, q_lora_rank=24,
          num_experts_per_tok=2, n_routed_experts=4, routed_scaling_factor=1.5,
          max_position_embeddings=64, layer_types=[
              "sliding_attention", "compressed_sparse_attention",
              "heavily_compressed_attention", "compressed_sparse_attention"],
          compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
          hc_mult=3, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], swiglu_limit=0.5,
          sliding_window=6, o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=12,
          index_topk=2, initializer_range=0.1, num_nextn_predict_layers=0)

CONFIGS = {
    # V3: sigmoid router with a non-zero correction bias, group-limited routing, q_lora.
    "deepseek_v3": ("DeepseekV3", dict(
        MLA, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)),
    # V2: softmax / greedy routing, no q_lora, attention biases.
    "deepseek_v2": ("DeepseekV2", dict(
        MLA, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=6, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy",
        routed_scaling_factor=1.0, attention_bias=True)),
    "llama": ("Llama", dict(DENSE)),
    "qwen2": ("Qwen2", dict(DENSE, tie_word_embeddings=True)),
    # YaRN-scaled V3 (attention factor != 1, mscale_all_dim softmax correction),
    # rotate-half RoPE layout, greedy single-group routing.
    "deepseek_v3_yarn": ("DeepseekV3", dict(
        MLA, num_hidden_layers=2, q_lora_rank=24, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        norm_topk_prob=False, rope_interleave=False, max_position_embeddings=128,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                             original_max_position_embeddings=16, beta_fast=32.0,
                             beta_slow=1.0, mscale=1.0, mscale_all_dim=0.7))),
    # V3.2 with DSA: index_topk < SEQ (sparse), MoE with group routing. A key whose
    # q.k is negative for every indexer head scores exactly 0 (ReLU), and torch's topk
    # breaks ties unpredictably: 16 heads make such ties rare (1/2^16 per key).
    "deepseek_v32": ("DeepseekV32", dict(
        MLA, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, index_topk=6, index_head_dim=16, index_n_heads=16)),
    # V3.2 with index_topk >= SEQ: attention is dense.
    "deepseek_v32_dense": ("DeepseekV32", dict(
        MLA, num_hidden_layers=2, q_lora_rank=24, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        index_topk=32, index_head_dim=12, index_n_heads=2)),
    "deepseek_v4": ("DeepseekV4", dict(V4)),
    # deepseek_v4 with experts 32 wide: FP4's groups of 32 inputs fit every expert weight
    # (fp8_reference.py v4 re-quantizes it as DeepSeek releases V4).
    "deepseek_v4_fp4": ("DeepseekV4", dict(V4, moe_intermediate_size=32)),
    # V4 with the sigmoid router, legacy keys (compress_ratios, num_hash_layers) and
    # HF's default schedule shapes.
    "deepseek_v4_sigmoid": ("DeepseekV4", dict(
        vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, head_dim=16, qk_rope_head_dim=4, q_lora_rank=16,
        num_experts_per_tok=2, n_routed_experts=4, scoring_func="sigmoid",
        max_position_embeddings=64, compress_ratios=[4, 0], num_hash_layers=1,
        hc_mult=2, swiglu_limit=1.0, sliding_window=8, o_groups=4, o_lora_rank=4,
        index_n_heads=8, index_head_dim=8, index_topk=3, initializer_range=0.1,
        num_nextn_predict_layers=0)),
    # R1-Distill-Llama style llama3 RoPE scaling.
    "llama3_rope": ("Llama", dict(DENSE, max_position_embeddings=128, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8))),
}


def tokens():
    rng = np.random.default_rng(1234)
    return rng.integers(0, VOCAB, size=(2, SEQ)).astype(np.int64)


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


PAD = 5  # left padding of row 0 in the padded batch


def padded_batch(ids):
    """(tokens, attention mask, positions): row 0 left-padded by PAD (token 0)."""
    ids = ids.copy()
    mask = np.ones_like(ids)
    ids[0, :PAD], mask[0, :PAD] = 0, 0
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def dsa_outputs(model, ids):
    """(logits of the padded batch, (L, B, T, K) indexer top-k on `ids`) of a V3.2 model."""
    picks = []
    hooks = [layer.self_attn.indexer.register_forward_hook(
        lambda m, i, out: picks.append(out.numpy())) for layer in model.model.layers]
    logits_of(model, ids)
    for h in hooks:
        h.remove()
    p_ids, p_mask, p_pos = padded_batch(ids)
    with torch.no_grad():
        padded = model(torch.tensor(p_ids), attention_mask=torch.tensor(p_mask),
                       position_ids=torch.tensor(p_pos)).logits.float().numpy()
    return padded, np.stack(picks)


V4_ZERO_INIT = ("sinks", "position_bias", "hc.base", "hc.scale", "hc_base", "hc_scale")


def perturb(model, gen):
    """Norm weights away from 1 and correction biases away from 0, so they matter; V4's
    sinks, compressor position biases and hyper-connection base/scale random and its
    hash table a random expert choice per token (transformers initialises them to 0/1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name.endswith(V4_ZERO_INIT):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + name.endswith("scale"))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(experts, generator=gen)[:b.shape[1]]
                                     for _ in range(b.shape[0])]))


def build(out_dir, names):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids = tokens()
    result = {"tokens": ids}
    for name in names:
        family, kw = CONFIGS[name]
        cfg = getattr(transformers, f"{family}Config")(**kw)
        model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
        perturb(model, gen)
        model.save_pretrained(os.path.join(out_dir, name))
        result[name] = logits_of(model, ids)
        if family == "DeepseekV32":
            result[f"{name}_padded"], result[f"{name}_topk"] = dsa_outputs(model, ids)
        if family == "DeepseekV4":  # left-padded, and shorter than window and rates
            p_ids, p_mask, p_pos = padded_batch(ids)
            with torch.no_grad():
                result[f"{name}_padded"] = model(
                    torch.tensor(p_ids), attention_mask=torch.tensor(p_mask),
                    position_ids=torch.tensor(p_pos)).logits.float().numpy()
            result[f"{name}_short"] = logits_of(model, ids[:, :3])
    np.savez(os.path.join(out_dir, "reference.npz"), **result)


def reload(dirs):
    for d in dirs:
        ids = np.load(os.path.join(d, "tokens.npy"))
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            d, output_loading_info=True, attn_implementation="eager")
        np.savez(os.path.join(d, "reloaded.npz"), logits=logits_of(model.eval(), ids))
        with open(os.path.join(d, "loading_info.json"), "w") as f:
            json.dump({k: sorted(map(str, v)) for k, v in info.items()}, f)


def generate(n, dirs):
    """transformers' own greedy `generate` with its KV cache, one prompt at a time."""
    for d in dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None  # run all n steps, like our stop_ids=()
        rows = []
        for prompt in np.load(os.path.join(d, "prompts.npy"), allow_pickle=True):
            ids = torch.tensor([list(prompt)])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, use_cache=True)
            rows.append(out[0, ids.shape[1]:].numpy())
        np.save(os.path.join(d, "generated.npy"), np.stack(rows))


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3:] or list(CONFIGS))
    elif sys.argv[1] == "generate":
        generate(int(sys.argv[2]), sys.argv[3:])
    else:
        reload(sys.argv[2:])
