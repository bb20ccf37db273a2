"""The config.json of DeepSeek-V4-Flash and DeepSeek-V4-Pro as released (April 2026,
huggingface.co/deepseek-ai/DeepSeek-V4-Flash and .../DeepSeek-V4-Pro), as quoted in public
code and Hub copies (no download), without the quantization fields. Flash's is quoted from
DeepSeek-V4-Flash-Base, the same shape (and transformers 5.23's DeepseekV4Config
defaults); Pro's also equals MindFormers' DeepseekV4Config defaults.
configs/deepseek-v4-flash.flags and configs/deepseek-v4-pro.flags are these shapes.

`compress_ratios` has one entry per layer plus a trailing 0 for the MTP block (transformers
reads the first num_hidden_layers): 0 = sliding window only, 4 = CSA, 128 = HCA. The
compressed layers' YaRN is in the legacy `rope_scaling` key.
"""
import re

_COMMON = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "index_head_dim": 128, "index_n_heads": 64,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_experts_per_tok": 6, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_lora_rank": 1024,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                     "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 129280,
    "compress_rope_theta": 160000,
}

FLASH = {**_COMMON, "hidden_size": 4096, "index_topk": 512, "moe_intermediate_size": 2048,
         "n_routed_experts": 256, "num_attention_heads": 64, "num_hidden_layers": 43,
         "o_groups": 8, "q_lora_rank": 1024, "routed_scaling_factor": 1.5,
         "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}

PRO = {**_COMMON, "hidden_size": 7168, "index_topk": 1024, "moe_intermediate_size": 3072,
       "n_routed_experts": 384, "num_attention_heads": 128, "num_hidden_layers": 61,
       "o_groups": 16, "q_lora_rank": 1536, "routed_scaling_factor": 2.5,
       "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0]}


def release_name(name: str) -> str:
    """transformers' save_pretrained name -> DeepSeek's own (the inverse of
    `hf_v4.from_release_name`, written out here from transformers' V4 renames)."""
    name = {"model.embed_tokens.weight": "embed.weight",
            "model.norm.weight": "norm.weight"}.get(name, name)
    name = re.sub(r"^model\.hc_head\.hc_", "hc_head_", name)
    name = re.sub(r"^model\.layers\.", "layers.", name)
    return re.sub(r"\.weight_scale_inv$", ".scale", name)
