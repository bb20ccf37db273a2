"""`python -m deepseek_tf.params --flagfile=configs/deepseek-v3-671b.flags`

Counts a model's parameters analytically from its config (nothing is allocated, and
TensorFlow is not imported): total, active per token (a token runs the shared
experts and `num_experts_per_tok` of the routed ones), and the MTP modules apart
(DeepSeek quotes V3 as 671B total / 37B active without its 14B of MTP weights).
Counts include the non-trainable router correction biases (and V4's hash-routing
tables, one expert id per token and choice). `flops_per_token` gives
the training FLOPs per token that `bench/train_throughput.py` divides by for MFU.

Example:
    >>> count_parameters(ModelConfig())["total"]
    3281152
"""

from __future__ import annotations

from deepseek_tf.config import ModelConfig


def _compressor_params(c: ModelConfig, width: int, overlap: bool, rate: int) -> int:
    """A V4 KVCompressor: kv_proj, gate_proj, position_bias, kv_norm."""
    w = width * (2 if overlap else 1)
    return 2 * c.hidden_size * w + rate * w + width


def v4_attention_params(c: ModelConfig, layer_idx: int) -> int:
    """A V4Attention: low-rank queries, shared KV, grouped output, sinks; compressors and
    (CSA) the indexer."""
    d, h, hd, r = c.hidden_size, c.num_attention_heads, c.resolved_head_dim, c.q_lora_rank
    kind = c.layer_type(layer_idx)
    n = d * r + r + r * h * hd + d * hd + hd + h * hd * c.o_lora_rank
    n += c.o_groups * c.o_lora_rank * d + h
    if kind == "compressed_sparse_attention":
        rate, ih, ihd = c.compress_rate_csa, c.index_n_heads, c.index_head_dim
        n += _compressor_params(c, hd, True, rate) + _compressor_params(c, ihd, True, rate)
        n += r * ih * ihd + d * ih
    elif kind == "heavily_compressed_attention":
        n += _compressor_params(c, hd, False, c.compress_rate_hca)
    return n


def hyper_params(c: ModelConfig) -> int:
    """One HyperConnection (fn, base, scale); 0 without hyper-connections."""
    n = c.hc_mult
    return n * c.hidden_size * (2 + n) * n + (2 + n) * n + 3 if n else 0


def attention_params(c: ModelConfig, layer_idx: int = 0) -> int:
    d, h, b = c.hidden_size, c.num_attention_heads, c.attention_bias
    if c.attention_type == "v4":
        return v4_attention_params(c, layer_idx)
    if c.uses_mla:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            q = d * c.q_lora_rank + b * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
        else:
            q = d * h * qk
        kv_a = d * (c.kv_lora_rank + c.qk_rope_head_dim) + b * (c.kv_lora_rank + c.qk_rope_head_dim)
        kv_b = c.kv_lora_rank + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv_a + kv_b + h * c.v_head_dim * d + b * d + indexer_params(c)
    hd, kv = c.resolved_head_dim, c.resolved_kv_heads
    return d * (h + 2 * kv) * hd + b * (h + 2 * kv) * hd + h * hd * d


def indexer_params(c: ModelConfig) -> int:
    """The DSA indexer: wq_b, wk, k_norm (LayerNorm: scale + bias), weights_proj."""
    if not c.use_dsa:
        return 0
    di, hi = c.index_head_dim, c.index_n_heads
    return c.q_lora_rank * hi * di + c.hidden_size * di + 2 * di + c.hidden_size * hi


def mlp_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, active per token) of the feed-forward layer of block `layer_idx`."""
    d = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        return 3 * d * c.intermediate_size, 3 * d * c.intermediate_size
    e, k, f = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    router = d * e + router_state_params(c, layer_idx)
    shared = 3 * d * f * c.n_shared_experts
    return router + shared + routed_expert_params(c, layer_idx), router + shared + 3 * d * f * k


def routed_expert_params(c: ModelConfig, layer_idx: int) -> int:
    """The routed experts' weights of block `layer_idx` (gate, up, down of each; 0 in a
    dense block): what `--model.expert_parallel` splits over the workers."""
    if not c.is_moe_layer(layer_idx):
        return 0
    return 3 * c.hidden_size * c.moe_intermediate_size * c.n_routed_experts


def router_state_params(c: ModelConfig, layer_idx: int) -> int:
    """The router's non-trainable weights in block `layer_idx`: the correction bias
    (noaux_tc) or V4's hash table tid2eid (one expert id per token and choice)."""
    if not c.is_moe_layer(layer_idx):
        return 0
    if c.mlp_layer_type(layer_idx) == "hash_moe":  # tid2eid, no bias
        return c.vocab_size * c.num_experts_per_tok
    return c.n_routed_experts if c.topk_method == "noaux_tc" else 0


def block_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    attn = attention_params(c, layer_idx) + 2 * c.hidden_size + 2 * hyper_params(c)
    total, active = mlp_params(c, layer_idx)
    return attn + total, attn + active


def count_parameters(c: ModelConfig) -> dict[str, int]:
    """{"total", "active", "embedding", "mtp_total", "mtp_active"}; total/active exclude MTP."""
    d, v = c.hidden_size, c.vocab_size
    embedding = v * d
    total = active = embedding + d + (0 if c.tie_word_embeddings else v * d)
    if c.hc_mult:  # HyperHead
        total = active = total + c.hc_mult * d * c.hc_mult + c.hc_mult + 1
    for i in range(c.num_hidden_layers):
        t, a = block_params(c, i)
        total, active = total + t, active + a
    mtp_t = mtp_a = 0
    for k in range(1, c.num_nextn_predict_layers + 1):
        t, a = block_params(c, c.num_hidden_layers + k - 1)
        extra = 3 * d + 2 * d * d  # enorm, hnorm, shared_head.norm, eh_proj
        if c.hc_mult:              # V4: the module's own HyperHead
            extra += c.hc_mult * d * c.hc_mult + c.hc_mult + 1
        mtp_t, mtp_a = mtp_t + t + extra, mtp_a + a + extra
    return {"total": total, "active": active, "embedding": embedding,
            "mtp_total": mtp_t, "mtp_active": mtp_a}


def _keys_per_query(c: ModelConfig, layer_idx: int, t: int) -> tuple[int, int, int]:
    """(keys one query attends, indexer heads x width, keys its indexer scores) in
    block `layer_idx` at length t: dense T; V3.2's DSA the top-k; V4 its window plus
    the compressed entries it reads (CSA: the top-k of T / m, HCA: all T / m')."""
    if c.attention_type == "v4":
        kind = c.layer_type(layer_idx)
        window = min(c.sliding_window, t)
        if kind == "compressed_sparse_attention":
            entries = t // c.compress_rate_csa
            return (window + min(c.index_topk, entries),
                    c.index_n_heads * c.index_head_dim, entries)
        if kind == "heavily_compressed_attention":
            return window + t // c.compress_rate_hca, 0, 0
        return window, 0, 0
    if c.use_dsa:
        return min(c.index_topk, t), c.index_n_heads * c.index_head_dim, t
    return t, 0, 0


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) matmul FLOPs per token: 6 x active matmul weights
    (the embedding lookup excluded, every output head included) + attention
    6 x heads x (qk width + v width) x the keys each query attends per block (PaLM's
    convention, no causal discount; sparse layers count their selected keys, V4 its
    window and compressed entries) + 6 x the lightning indexers' scoring."""
    p = count_parameters(c)
    d, h = c.hidden_size, c.num_attention_heads
    head = c.vocab_size * d
    matmul = (p["active"] - p["embedding"] - (0 if c.tie_word_embeddings else head)
              + head * (1 + c.num_nextn_predict_layers) + p["mtp_active"])
    qk, dv = ((c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.uses_mla
              else (c.resolved_head_dim, c.resolved_head_dim))
    attention = 0
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        keys, index_width, index_keys = _keys_per_query(c, i, seq_len)
        attention += h * (qk + dv) * keys + index_width * index_keys
    return 6.0 * matmul + 6.0 * attention


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def report(c: ModelConfig) -> str:
    p = count_parameters(c)
    lines = [f"total parameters:   {p['total']:>18,}  ({_human(p['total'])})",
             f"active per token:   {p['active']:>18,}  ({_human(p['active'])}; "
             f"{_human(p['active'] - p['embedding'])} without the embedding)",
             f"embedding:          {p['embedding']:>18,}  ({_human(p['embedding'])})"]
    if p["mtp_total"]:
        lines.append(f"MTP modules:        {p['mtp_total']:>18,}  ({_human(p['mtp_total'])}; "
                     f"{_human(p['mtp_active'])} active; embedding and head shared)")
        lines.append(f"total with MTP:     {p['total'] + p['mtp_total']:>18,}  "
                     f"({_human(p['total'] + p['mtp_total'])})")
    return "\n".join(lines)


def main(argv):
    from deepseek_tf import flags as dflags
    exp = dflags.experiment_from_flags(dflags.FLAGS)
    print(report(exp.model))


def entry():
    from deepseek_tf.quiet import quiet_tensorflow
    quiet_tensorflow()  # TF log noise off (README)
    from absl import flags

    from deepseek_tf import flags as dflags
    dflags.define_flags()
    flags.adopt_module_key_flags(dflags)
    dflags.run(main)


if __name__ == "__main__":
    entry()
