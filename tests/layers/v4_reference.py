"""DeepSeek-V4 modules of transformers on tiny random weights (run in a subprocess:
torch never enters the TF test process).

    python v4_reference.py OUT.npz

writes, per case, the module's weights (`<case>/w/<name>`: the checkpoint names that
save_pretrained writes, relative to the module), its inputs
(`<case>/in/<name>`) and its outputs (`<case>/out/<name>`), all as numpy arrays. The
cases: hyper-connection, hyper-head, the MoE block for each scoring function with hash
and top-k routing, and the attention of each layer type on a plain and a left-padded
batch. Nothing is downloaded; the seed is fixed.
"""

import sys

import numpy as np
import torch
import transformers
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

B, T, VOCAB = 2, 19, 64
PAD = 3  # left padding of row 0 in the padded attention case
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention",
               "heavily_compressed_attention"]
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=1, head_dim=16, qk_rope_head_dim=8,
    q_lora_rank=24, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
    routed_scaling_factor=1.5, max_position_embeddings=64, layer_types=LAYER_TYPES,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=3, hc_sinkhorn_iters=20, mlp_layer_types=["hash_moe", "moe", "moe"],
    swiglu_limit=0.3, sliding_window=6, o_groups=2, o_lora_rank=8, index_n_heads=8,
    index_head_dim=12, index_topk=2, rope_theta=10000.0, compress_rope_theta=160000.0)


def config(**kw):
    cfg = transformers.DeepseekV4Config(**{**CONFIG, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def randomize(module, gen):
    """Every parameter random (norm weights near 1); tid2eid a random expert table."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("tid2eid"):
                rows = [torch.randperm(CONFIG["n_routed_experts"], generator=gen)[:b.shape[1]]
                        for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return module


def weights(full, prefix):
    """The tensors under `prefix` of `full`'s checkpoint (save_pretrained's names)."""
    saved = revert_weight_conversion(full, full.state_dict())
    return {k[len(prefix):]: v.detach().float().numpy() if v.is_floating_point()
            else v.numpy() for k, v in saved.items() if k.startswith(prefix)}


def attention_case(full, layer_idx, gen, padded):
    cfg = full.config
    attn = full.model.layers[layer_idx].self_attn
    x = torch.randn(B, T, cfg.hidden_size, generator=gen)
    keep = torch.ones(B, T, dtype=torch.bool)
    if padded:
        keep[0, :PAD] = False
    pos = (torch.cumsum(keep.long(), 1) - 1).clamp(min=0)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (k <= q) & (q - k < cfg.sliding_window) & keep[:, None, :]  # (B, T, T)
    mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    rope = v4.DeepseekV4RotaryEmbedding(cfg)
    emb = {t: rope(x, position_ids=pos, layer_type=t) for t in ("main", "compress")}
    with torch.no_grad():
        out, _ = attn(x, position_embeddings=emb, position_ids=pos, attention_mask=mask)
    return {"x": x.numpy(), "positions": pos.numpy(), "keep": keep.numpy()}, \
        {"y": out.numpy()}


def main(path):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    result = {}
    models = {s: randomize(transformers.DeepseekV4ForCausalLM(config(scoring_func=s)), gen).eval()
              for s in ("sqrtsoftplus", "sigmoid")}  # HF V4 has no softmax (ACT2FN)
    full = models["sqrtsoftplus"]
    cfg = full.config

    def put(case, prefix, inputs, outputs, model=full):
        for group, d in (("w", weights(model, prefix)), ("in", inputs), ("out", outputs)):
            result.update({f"{case}/{group}/{k}": v for k, v in d.items()})

    streams = torch.randn(B, T, cfg.hc_mult, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        post, comb, collapsed = full.model.layers[0].attn_hc(streams)
        put("hc", "model.layers.0.hc_attn_", {"streams": streams.numpy()},
            {"post": post.numpy(), "comb": comb.numpy(), "collapsed": collapsed.numpy()})
        put("head", "model.hc_head.", {"streams": streams.numpy()},
            {"y": full.model.hc_head(streams).numpy()})

    for scoring, model in models.items():
        for layer_idx, kind in ((0, "hash"), (1, "topk")):
            x = torch.randn(B, T, cfg.hidden_size, generator=gen)
            ids = torch.randint(0, VOCAB, (B, T), generator=gen)
            with torch.no_grad():
                y = model.model.layers[layer_idx].mlp(x, input_ids=ids)
            put(f"moe_{scoring}_{kind}", f"model.layers.{layer_idx}.ffn.",
                {"x": x.numpy(), "input_ids": ids.numpy()}, {"y": y.numpy()}, model)

    for layer_idx, layer_type in enumerate(LAYER_TYPES):
        for padded in (False, True):
            inputs, outputs = attention_case(full, layer_idx, gen, padded)
            put(f"attn_{layer_type}{'_padded' if padded else ''}",
                f"model.layers.{layer_idx}.attn.", inputs, outputs)
    np.savez(path, **result)


if __name__ == "__main__":
    main(sys.argv[1])
