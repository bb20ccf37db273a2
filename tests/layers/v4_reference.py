"""DeepSeek-V4 modules of transformers on tiny random weights (run in a subprocess:
torch never enters the TF test process).

    python v4_reference.py OUT.npz

writes, per case, the module's weights (`<case>/w/<HF name>`), its inputs
(`<case>/in/<name>`) and its outputs (`<case>/out/<name>`), all as numpy arrays. The
cases: hyper-connection, hyper-head, the MoE block for each scoring function with hash
and top-k routing, and the attention of each layer type on a plain and a left-padded
batch. Nothing is downloaded; the seed is fixed.
"""

import sys

import numpy as np
import torch
import transformers
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


def weights(module):
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in module.state_dict().items()}


def attention_case(cfg, layer_idx, gen, padded):
    attn = randomize(v4.DeepseekV4Attention(cfg, layer_idx), gen).eval()
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
    return attn, {"x": x.numpy(), "positions": pos.numpy(), "keep": keep.numpy()}, \
        {"y": out.numpy()}


def main(path):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg, result = config(), {}

    def put(case, module, inputs, outputs):
        for group, d in (("w", weights(module)), ("in", inputs), ("out", outputs)):
            result.update({f"{case}/{group}/{k}": v for k, v in d.items()})

    streams = torch.randn(B, T, cfg.hc_mult, cfg.hidden_size, generator=gen)
    hc = randomize(v4.DeepseekV4HyperConnection(cfg), gen)
    with torch.no_grad():
        post, comb, collapsed = hc(streams)
    put("hc", hc, {"streams": streams.numpy()},
        {"post": post.numpy(), "comb": comb.numpy(), "collapsed": collapsed.numpy()})
    head = randomize(v4.DeepseekV4HyperHead(cfg), gen)
    with torch.no_grad():
        put("head", head, {"streams": streams.numpy()}, {"y": head(streams).numpy()})

    for scoring in ("sqrtsoftplus", "sigmoid"):  # HF V4 has no softmax (ACT2FN)
        scfg = config(scoring_func=scoring)
        for layer_idx, kind in ((0, "hash"), (1, "topk")):
            moe = randomize(v4.DeepseekV4SparseMoeBlock(scfg, layer_idx), gen).eval()
            x = torch.randn(B, T, cfg.hidden_size, generator=gen)
            ids = torch.randint(0, VOCAB, (B, T), generator=gen)
            with torch.no_grad():
                y = moe(x, input_ids=ids)
            put(f"moe_{scoring}_{kind}", moe, {"x": x.numpy(), "input_ids": ids.numpy()},
                {"y": y.numpy()})

    for layer_idx, layer_type in enumerate(LAYER_TYPES):
        for padded in (False, True):
            attn, inputs, outputs = attention_case(cfg, layer_idx, gen, padded)
            put(f"attn_{layer_type}{'_padded' if padded else ''}", attn, inputs, outputs)
    np.savez(path, **result)


if __name__ == "__main__":
    main(sys.argv[1])
