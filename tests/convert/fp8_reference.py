"""DeepSeek-style FP8 checkpoints and their references, made with torch + transformers
(run in a subprocess: torch never enters the TF test process).

    python fp8_reference.py make DIR ROWS COLS SHARDS
        DIR/deepseek_v3 (hf_reference's tiny V3, saved by save_pretrained; logits in
        DIR/reference.npz), then DIR/fp8 = it re-quantized as DeepSeek releases V3:
        2-D projections float8_e4m3fn + float32 `weight_scale_inv` per ROWSxCOLS block,
        embeddings / norms / router / lm_head bf16, an MTP layer `model.layers.<L>.*`,
        SHARDS shards + model.safetensors.index.json, quantization_config in config.json.
        Also DIR/fp8-dequant/: the same weights dequantized by transformers' own
        `_dequantize_fp8_weight` (float32), its logits.npy on the reference tokens and
        generated.npy, transformers' greedy tokens for PROMPTS.
    python fp8_reference.py quantize SRC OUT ROWS COLS SHARDS
        Only the re-quantization of `make` (OUT from the saved model SRC), no references.
    python fp8_reference.py reload DIR...
        An FP8 export DIR, logits on DIR/tokens.npy -> DIR/reloaded.npz: `logits` of it
        dequantized by transformers' `_dequantize_fp8_weight` into DIR-dequant/ and
        loaded with from_pretrained; `fp8_loader` of from_pretrained(DIR) itself, i.e.
        transformers' fine-grained FP8 integration (it needs accelerate; without a GPU it
        dequantizes every weight at load time, here into float32, and runs plain
        Linear layers: there is no FP8 matmul on CPU). That loader takes the block size
        from the scale grid (rows / scale rows), so it is exact only where every weight
        is a whole number of blocks. DIR/fp8_load.txt says how the two compare.
    python fp8_reference.py v4 DIR ROWS COLS SHARDS
        DIR/deepseek_v4_fp4 (hf_reference's tiny V4, saved by save_pretrained), then
        DIR/fp4 = it re-quantized as DeepSeek releases V4: routed experts FP4 (int8 [out,
        in / 2], two e2m1 values per byte, low nibble first; one float8_e8m0fnu scale
        per 32 inputs, the format of transformers' mxfp4 / `expert_dtype: fp4`), the
        other 2-D projections FP8 with a float32 `weight_scale_inv` per ROWSxCOLS block,
        embeddings / norms / head bf16, the rest as saved; SHARDS shards + index,
        `quantization_config` with `expert_dtype: fp4`. DIR/fp4-dequant/: the weights
        dequantized by transformers' own code (`Fp8Dequantize._dequantize_one` for FP4,
        `_dequantize_fp8_weight` for FP8), its logits.npy on the reference tokens and
        generated.npy, greedy tokens of PROMPTS (argmax of full forward passes).
    python fp8_reference.py fp4 OUT.npz
        Random FP4-packed expert weights (V4's layout: int8 [E, out, in / 2], scales per
        32 inputs as uint8 exponents and as float32) and transformers' own
        dequantization of them (`Fp8Dequantize._dequantize_one`).
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_reference import build, generate, logits_of, tokens  # noqa: E402

PROMPTS = [[1, 17, 42, 99, 250, 7], [3, 3, 140, 5, 288, 61, 12, 30, 44]]
NEW_TOKENS = 16
V4_NEW_TOKENS = 6  # transformers side: a full forward pass each

KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_head.head")


def quantizable(name, t):
    return t.ndim == 2 and name.endswith(".weight") and not any(k in name for k in KEEP)


def quantize(w, block):
    rows, cols = w.shape
    r, c = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(r * block[0], c * block[1])
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(r, block[0], c, block[1]).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale.float()


def with_mtp(tensors, cfg, gen):
    """DeepSeek-V3's release layout: one MTP layer after the last decoder layer."""
    last, mtp = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"]
    d = cfg["hidden_size"]
    out = dict(tensors)
    for k, v in tensors.items():
        if k.startswith(f"model.layers.{last}."):
            out[k.replace(f"layers.{last}.", f"layers.{mtp}.")] = v + 0.01 * torch.randn(
                v.shape, generator=gen)
    p = f"model.layers.{mtp}"
    out.update({f"{p}.enorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}.hnorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}.shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}.eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=gen),
                f"{p}.embed_tokens.weight": tensors["model.embed_tokens.weight"],
                f"{p}.shared_head.head.weight": tensors["lm_head.weight"]})
    return out


def write_shards(out, tensors, n):
    names = sorted(tensors)
    weight_map, per = {}, -(-len(names) // n)
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        chunk = {k: tensors[k].contiguous() for k in names[i * per:(i + 1) * per]}
        save_file(chunk, os.path.join(out, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def dequantized(tensors, block):
    out = {}
    for k, t in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        s = tensors.get(k + "_scale_inv")
        out[k] = (_dequantize_fp8_weight(t, s, block, torch.float32) if s is not None
                  else t.float())
    return out


def load_dequantized(src_dir, cfg, tensors, block, out_dir):
    """from_pretrained on `tensors` dequantized (plain float32, no quantization_config)."""
    os.makedirs(out_dir, exist_ok=True)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**plain, "dtype": "float32"}, f)
    save_file(dequantized(tensors, block), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32).eval()


def cmd_quantize(src, out, rows, cols, shards, references=True):
    block = [int(rows), int(cols)]
    gen = torch.Generator().manual_seed(1)
    cfg = json.load(open(os.path.join(src, "config.json")))
    plain = with_mtp(load_file(os.path.join(src, "model.safetensors")), cfg, gen)
    tensors = {}
    for k, t in plain.items():
        if quantizable(k, t):
            tensors[k], tensors[k + "_scale_inv"] = quantize(t.float(), block)
        elif k.endswith("e_score_correction_bias"):
            tensors[k] = t.float()
        else:
            tensors[k] = t.to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    write_shards(out, tensors, int(shards))
    cfg.update(num_nextn_predict_layers=1, quantization_config=dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=block))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if not references:
        return
    model = load_dequantized(out, cfg, tensors, block, out + "-dequant")
    np.save(os.path.join(out + "-dequant", "logits.npy"), logits_of(model, tokens()))
    np.save(os.path.join(out + "-dequant", "prompts.npy"), np.array(PROMPTS, dtype=object),
            allow_pickle=True)
    generate(NEW_TOKENS, [out + "-dequant"])


def cmd_make(out_dir, rows, cols, shards):
    build(out_dir, ["deepseek_v3"])
    cmd_quantize(os.path.join(out_dir, "deepseek_v3"), os.path.join(out_dir, "fp8"), rows,
                 cols, shards)


def cmd_reload(dirs):
    for d in dirs:
        cfg = json.load(open(os.path.join(d, "config.json")))
        block = cfg["quantization_config"]["weight_block_size"]
        index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
        tensors = {}
        for shard in sorted(set(index.values())):
            tensors.update(load_file(os.path.join(d, shard)))
        ids = np.load(os.path.join(d, "tokens.npy"))
        model = load_dequantized(d, cfg, tensors, block, d + "-dequant")
        out = {"logits": logits_of(model, ids)}
        try:  # transformers' fine-grained FP8 integration (dequantizes at load on CPU)
            fp8 = transformers.AutoModelForCausalLM.from_pretrained(
                d, attn_implementation="eager", dtype=torch.float32).eval()
            out["fp8_loader"] = logits_of(fp8, ids)
            diff = np.abs(out["fp8_loader"] - out["logits"]).max()
            note = f"loaded; max-abs-diff to the float32 dequantized model {diff:.3e}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            note = f"from_pretrained failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        np.savez(os.path.join(d, "reloaded.npz"), **out)
        with open(os.path.join(d, "fp8_load.txt"), "w") as f:
            f.write(note + "\n")
        shutil.rmtree(d + "-dequant")


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_fp4(w):
    """(int8 [out, in / 2] packed e2m1 codes, float8_e8m0fnu [out, in / 32] scales): the
    power-of-two scale puts each group's max |w| at or below 6, the largest e2m1."""
    out, n = w.shape
    groups = w.float().reshape(out, n // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -100)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    x = groups / scale
    code = (x.abs()[..., None] - FP4_GRID).abs().argmin(-1) + 8 * (x < 0)
    code = code.reshape(out, n).to(torch.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    return packed, scale.reshape(out, n // 32).to(torch.float8_e8m0fnu)


def dequantized_v4(tensors, block):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    fp4 = Fp8Dequantize(None)
    out = {}
    for k, t in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        s = tensors.get(k + "_scale_inv")
        if s is None:
            out[k] = t.float() if t.is_floating_point() else t
        elif t.dtype == torch.int8:
            out[k] = fp4._dequantize_one(t, s, torch.float32)
        else:
            out[k] = _dequantize_fp8_weight(t, s, block, torch.float32)
    return out


def cmd_v4(out_dir, rows, cols, shards):
    from hf_reference import build as build_models
    block = [int(rows), int(cols)]
    build_models(out_dir, ["deepseek_v4_fp4"])
    src, out = os.path.join(out_dir, "deepseek_v4_fp4"), os.path.join(out_dir, "fp4")
    cfg = json.load(open(os.path.join(src, "config.json")))
    tensors = {}
    for k, t in load_file(os.path.join(src, "model.safetensors")).items():
        if ".ffn.experts." in k:
            tensors[k], tensors[k + "_scale_inv"] = quantize_fp4(t)
        elif t.ndim == 2 and k.endswith(".weight") and not any(
                n in k for n in ("embed_tokens", "head", "norm", "gate.weight")):
            tensors[k], tensors[k + "_scale_inv"] = quantize(t.float(), block)
        elif k.endswith(("embed_tokens.weight", "head.weight", "norm.weight")):
            tensors[k] = t.to(torch.bfloat16)
        else:
            tensors[k] = t
    os.makedirs(out, exist_ok=True)
    write_shards(out, tensors, int(shards))
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=block, expert_dtype="fp4")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    dq = out + "-dequant"
    os.makedirs(dq, exist_ok=True)
    with open(os.path.join(dq, "config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if k != "quantization_config"}, f)
    save_file(dequantized_v4(tensors, block), os.path.join(dq, "model.safetensors"),
              metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dq, attn_implementation="eager", dtype=torch.float32).eval()
    np.save(os.path.join(dq, "logits.npy"), logits_of(model, tokens()))
    rows_out = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(V4_NEW_TOKENS):
            ids.append(int(logits_of(model, np.array([ids]))[0, -1].argmax()))
        rows_out.append(ids[len(prompt):])
    np.save(os.path.join(dq, "generated.npy"), np.array(rows_out))
    np.save(os.path.join(dq, "prompts.npy"), np.array(PROMPTS, dtype=object),
            allow_pickle=True)


def cmd_fp4(path):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    gen = torch.Generator().manual_seed(2)
    packed = torch.randint(-128, 128, (3, 8, 48), generator=gen, dtype=torch.int8)
    exponents = torch.randint(120, 134, (3, 8, 3), generator=gen, dtype=torch.uint8)
    scales = torch.rand((3, 8, 3), generator=gen) * 2
    ref = Fp8Dequantize(None)
    out = {"packed": packed.numpy(), "exponents": exponents.numpy(), "scales": scales.numpy()}
    for key, s in (("from_exponents", exponents), ("from_scales", scales)):
        out[key] = np.stack([ref._dequantize_one(packed[e], s[e], torch.float32).numpy()
                             for e in range(packed.shape[0])])
    np.savez(path, **out)


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    if sys.argv[1] == "make":
        cmd_make(*sys.argv[2:6])
    elif sys.argv[1] == "quantize":
        cmd_quantize(*sys.argv[2:7], references=False)
    elif sys.argv[1] == "v4":
        cmd_v4(*sys.argv[2:6])
    elif sys.argv[1] == "fp4":
        cmd_fp4(sys.argv[2])
    else:
        cmd_reload(sys.argv[2:])
