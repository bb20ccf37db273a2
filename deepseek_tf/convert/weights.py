"""The one-to-one map between HF tensor names and our model's variables.

Each `Entry` names one HF tensor (torch layout: Linear weights are [out, in]) and
the slice of one of our variables it fills (Dense kernels are [in, out], so
Linear weights are transposed). HF stores experts one by one
(`mlp.experts.{i}.{gate,up,down}_proj.weight`); we stack them: `gate_up_proj`
[E, d, 2f] holds gate in [..., :f] and up in [..., f:], `down_proj` is [E, f, d].
MTP modules use DeepSeek-V3's released layout: `model.layers.{L + k - 1}.{enorm,
hnorm, eh_proj, shared_head.norm}` plus a decoder block under the same prefix; V4's
use DeepSeek-V4's: `mtp.{k - 1}.{enorm, hnorm, e_proj, h_proj, norm, hc_head_*}` plus
the block (transformers' V4 class has no MTP and ignores these).

Example:
    >>> entries = weight_entries(model)
    >>> entries[0].name
    'model.embed_tokens.weight'
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str            # HF tensor name
    variable: object     # our Keras variable
    index: tuple = ()    # numpy index into the variable (() = all of it)
    transpose: bool = False

    def hf_shape(self) -> tuple[int, ...]:
        shape = np.empty(tuple(self.variable.shape), dtype=bool)[self.index].shape
        return shape[::-1] if self.transpose else shape


def _linear(name: str, dense, bias: bool | None = None) -> list[Entry]:
    out = [Entry(f"{name}.weight", dense.kernel, transpose=True)]
    if dense.use_bias if bias is None else bias:
        out.append(Entry(f"{name}.bias", dense.bias))
    return out


def _norm(name: str, norm) -> Entry:
    return Entry(f"{name}.weight", norm.scale)


#: HF names of a DeepSeekMoE's parts (V2/V3 classes) and of DeepSeek-V4's checkpoints.
MOE_NAMES = {"bias": "e_score_correction_bias", "gate_proj": "gate_proj",
             "up_proj": "up_proj", "down_proj": "down_proj"}
V4_MOE_NAMES = {"bias": "bias", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _mlp(prefix: str, mlp, names=MOE_NAMES) -> list[Entry]:
    return [e for p in ("gate_proj", "up_proj", "down_proj")
            for e in _linear(f"{prefix}.{names[p]}", getattr(mlp, p))]


def _attention(prefix: str, attn) -> list[Entry]:
    if hasattr(attn, "kv_b_proj"):  # MLA
        names = (["q_a_proj", "q_b_proj"] if attn.q_lora_rank else ["q_proj"]) + [
            "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        out = [e for n in names for e in _linear(f"{prefix}.{n}", getattr(attn, n))]
        if attn.q_lora_rank:
            out.append(_norm(f"{prefix}.q_a_layernorm", attn.q_a_layernorm))
        out.append(_norm(f"{prefix}.kv_a_layernorm", attn.kv_a_layernorm))
        return out + (_indexer(f"{prefix}.indexer", attn.indexer) if attn.indexer else [])
    return [e for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            for e in _linear(f"{prefix}.{n}", getattr(attn, n))]


def _indexer(prefix: str, ix) -> list[Entry]:
    """DeepSeek-V3.2's DSA indexer (HF `DeepseekV32Indexer`; k_norm is a LayerNorm)."""
    out = [e for n in ("wq_b", "wk", "weights_proj") for e in _linear(f"{prefix}.{n}",
                                                                      getattr(ix, n))]
    return out + [Entry(f"{prefix}.k_norm.weight", ix.k_norm.gamma),
                  Entry(f"{prefix}.k_norm.bias", ix.k_norm.beta)]


def _compressor(prefix: str, c) -> list[Entry]:
    """A V4 `KVCompressor` (DeepSeek's `compressor.{wkv, wgate, ape, norm}`)."""
    return (_linear(f"{prefix}.wkv", c.kv_proj) + _linear(f"{prefix}.wgate", c.gate_proj)
            + [Entry(f"{prefix}.ape", c.position_bias), _norm(f"{prefix}.norm", c.kv_norm)])


def v4_attention_entries(prefix: str, attn) -> list[Entry]:
    """A `V4Attention` under DeepSeek-V4's checkpoint names (`layers.{i}.attn`), which
    transformers' save_pretrained writes and from_pretrained renames; `wo_a` keeps
    its [groups * o_lora_rank, per-group input] layout."""
    out = [e for n, layer in (("wq_a", attn.q_a_proj), ("wq_b", attn.q_b_proj),
                              ("wkv", attn.kv_proj), ("wo_b", attn.o_b_proj))
           for e in _linear(f"{prefix}.{n}", layer)]
    out += [_norm(f"{prefix}.q_norm", attn.q_a_norm), _norm(f"{prefix}.norm", attn.kv_norm),
            Entry(f"{prefix}.wo_a.weight", attn.o_a_proj), Entry(f"{prefix}.attn_sink", attn.sinks)]
    if attn.compressor is not None:
        out += _compressor(f"{prefix}.compressor", attn.compressor)
    if attn.indexer is not None:
        out += _compressor(f"{prefix}.indexer.compressor", attn.index_compressor)
        out += _linear(f"{prefix}.indexer.wq_b", attn.indexer.wq_b)
        out += _linear(f"{prefix}.indexer.weights_proj", attn.indexer.weights_proj)
    return out


def v4_moe_entries(prefix: str, moe) -> list[Entry]:
    """A `DeepSeekMoE` under DeepSeek-V4's names (`layers.{i}.ffn`: experts' w1 = gate,
    w3 = up, w2 = down; `gate.bias` the correction bias, `gate.tid2eid` the hash table)."""
    return _moe(prefix, moe, V4_MOE_NAMES)


def hyper_entries(prefix: str, hc, head: bool = False) -> list[Entry]:
    """A `HyperConnection` (`{prefix}_fn/_base/_scale`, e.g. `layers.0.hc_attn`) or the
    `HyperHead` (`hc_head.hc_fn/...`); fn is stored [out, in]."""
    sep = "." if head else "_"
    return [Entry(f"{prefix}{sep}hc_fn" if head else f"{prefix}_fn", hc.fn, transpose=True),
            Entry(f"{prefix}{sep}hc_base" if head else f"{prefix}_base", hc.base),
            Entry(f"{prefix}{sep}hc_scale" if head else f"{prefix}_scale", hc.scale)]


def _v4_block(prefix: str, block) -> list[Entry]:
    """A V4 decoder block under DeepSeek-V4's names."""
    out = [_norm(f"{prefix}.attn_norm", block.input_layernorm),
           _norm(f"{prefix}.ffn_norm", block.post_attention_layernorm)]
    out += v4_attention_entries(f"{prefix}.attn", block.self_attn)
    out += v4_moe_entries(f"{prefix}.ffn", block.mlp)
    return out + hyper_entries(f"{prefix}.hc_attn", block.attn_hc) + hyper_entries(
        f"{prefix}.hc_ffn", block.ffn_hc)


def _moe(prefix: str, moe, names=MOE_NAMES) -> list[Entry]:
    f, n = moe.moe_intermediate_size, names
    out = [Entry(f"{prefix}.gate.weight", moe.gate.kernel, transpose=True)]
    if moe.gate.e_score_correction_bias is not None:
        out.append(Entry(f"{prefix}.gate.{n['bias']}", moe.gate.e_score_correction_bias))
    if moe.gate.tid2eid is not None:
        out.append(Entry(f"{prefix}.gate.tid2eid", moe.gate.tid2eid))
    for i in range(moe.num_experts):
        p = f"{prefix}.experts.{i}"
        out += [Entry(f"{p}.{n['gate_proj']}.weight", moe.gate_up_proj, (i, slice(None), slice(0, f)), True),
                Entry(f"{p}.{n['up_proj']}.weight", moe.gate_up_proj, (i, slice(None), slice(f, 2 * f)), True),
                Entry(f"{p}.{n['down_proj']}.weight", moe.down_proj, (i,), True)]
    if moe.shared_experts is not None:
        out += _mlp(f"{prefix}.shared_experts", moe.shared_experts, names)
    return out


def _block(prefix: str, block) -> list[Entry]:
    if block.config.attention_type == "v4":
        return _v4_block(prefix, block)
    out = [_norm(f"{prefix}.input_layernorm", block.input_layernorm),
           _norm(f"{prefix}.post_attention_layernorm", block.post_attention_layernorm)]
    out += _attention(f"{prefix}.self_attn", block.self_attn)
    out += _moe(f"{prefix}.mlp", block.mlp) if block.is_moe else _mlp(f"{prefix}.mlp", block.mlp)
    return out


def weight_entries(model, include_mtp: bool = True) -> list[Entry]:
    """Every HF tensor of `model` (a built DeepSeekCausalLM), in a stable order."""
    out = [Entry("model.embed_tokens.weight", model.embed_tokens.embeddings)]
    for i, block in enumerate(model.blocks):
        out += _block(f"model.layers.{i}", block)
    out.append(_norm("model.norm", model.norm))
    v4 = model.config.attention_type == "v4"
    if v4:
        out += hyper_entries("model.hc_head", model.hc_head, head=True)
    if model.lm_head is not None:
        out.append(Entry("head.weight" if v4 else "lm_head.weight", model.lm_head.kernel,
                         transpose=True))
    if include_mtp:
        out += _mtp_entries(model)
    return out


def _mtp_entries(model) -> list[Entry]:
    out = []
    for k, m in enumerate(model.mtp, start=1):
        if model.config.attention_type == "v4":  # DeepSeek-V4's own names: mtp.{k-1}.*
            p = f"mtp.{k - 1}"
            out += [_norm(f"{p}.enorm", m.enorm), _norm(f"{p}.hnorm", m.hnorm),
                    *_linear(f"{p}.e_proj", m.e_proj), *_linear(f"{p}.h_proj", m.h_proj),
                    _norm(f"{p}.norm", m.norm), *hyper_entries(f"{p}.hc_head", m.hc_head)]
        else:
            p = f"model.layers.{model.config.num_hidden_layers + k - 1}"
            out += [_norm(f"{p}.enorm", m.enorm), _norm(f"{p}.hnorm", m.hnorm),
                    Entry(f"{p}.eh_proj.weight", m.eh_proj.kernel, transpose=True),
                    _norm(f"{p}.shared_head.norm", m.norm)]
        out += _block(p, m.block)
    return out


def mtp_duplicates(model) -> set[str]:
    """Per-module copies of the shared embedding/head in DeepSeek's MTP layout (ignored)."""
    return {f"model.layers.{model.config.num_hidden_layers + k - 1}.{n}"
            for k in range(1, len(model.mtp) + 1)
            for n in ("embed_tokens.weight", "shared_head.head.weight")}


def checked_entries(model, names, shape_of, include_mtp: bool = True) -> list[Entry]:
    """`weight_entries(model)` after checking them against a checkpoint's tensors.

    Every tensor in `names` must be used and every entry present with the shape the
    config implies (`shape_of(name)`): a missing or extra tensor or a shape mismatch
    raises UserError naming it.
    """
    entries = weight_entries(model, include_mtp)
    available = set(names)
    ignored = mtp_duplicates(model) | (
        {"lm_head.weight"} if model.lm_head is None else set())
    expected = {e.name for e in entries}
    extra = sorted(available - expected - ignored)
    if extra:
        raise UserError(f"unexpected tensor {extra[0]} in the checkpoint"
                        f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: "
                        f"it does not match this architecture/config.")
    missing = [n for n in (e.name for e in entries) if n not in available]
    if missing:
        raise UserError(f"missing tensor {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                        f"in the checkpoint.")
    for e in entries:
        shape = shape_of(e.name)
        if tuple(shape) != e.hf_shape():
            raise UserError(f"tensor {e.name} has shape {list(shape)} but the config "
                            f"implies {list(e.hf_shape())}.")
    return entries


def export_tensors(model, include_mtp: bool = True) -> dict[str, np.ndarray]:
    """HF name -> float32 numpy array for every weight of `model` (int64 for integer
    ones: V4's hash-routing table; int8-stored weights dequantized)."""
    from deepseek_tf.layers.quantized import dequantize_int8, scale_variables

    scales = scale_variables(model)
    values, out = {}, {}
    for e in weight_entries(model, include_mtp):
        if id(e.variable) in scales and id(e.variable) not in values:
            values[id(e.variable)] = dequantize_int8(e.variable.numpy(),
                                                     scales[id(e.variable)].numpy())
        elif id(e.variable) not in values:
            v = e.variable.numpy()
            values[id(e.variable)] = np.asarray(
                v, np.int64 if np.issubdtype(v.dtype, np.integer) else np.float32)
        a = values[id(e.variable)][e.index]
        out[e.name] = np.ascontiguousarray(a.T if e.transpose else a)
    return out
