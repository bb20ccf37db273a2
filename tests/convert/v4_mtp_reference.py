"""A DeepSeek-V4 checkpoint with its MTP layer, and reference MTP logits, built from
transformers' own V4 layers (run in a subprocess: torch never enters the TF tests).

transformers 5.23 has DeepSeek-V4 but no MTP: it skips the checkpoint's `mtp.*`
tensors. DeepSeek's released inference code (`MTPBlock` in the V4 repository's
`inference/model.py`) defines the module, which we glue here around transformers'
decoder layer, HyperHead, RMSNorm and head:

    e = enorm(embed(t_{i+1}))                        # embedding shared with the model
    x_n = e_proj(e) + h_proj(hnorm(h_n))             # every stream n of the last layer
    x = DecoderLayer(x)                              # sliding window (compress ratio 0), top-k MoE
    logits = head(norm(hc_head(x)))                  # its own hc_head and norm, shared head

    python v4_mtp_reference.py OUT_DIR

writes OUT_DIR/model (config.json + model.safetensors, transformers' names for the main
model and DeepSeek's `mtp.0.*` for the MTP layer) and OUT_DIR/reference.npz: the tokens,
the main logits, the MTP logits, and the main logits of transformers' from_pretrained of
OUT_DIR/model (which must skip `mtp.*`). The MTP layer is layer L of an (L+1)-layer
transformers model whose hc_head and norm are the module's; forward hooks feed it.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

from tests.convert.hf_reference import V4, logits_of, perturb, tokens

_GLUE = ("enorm", "hnorm", "e_proj", "h_proj")


def _mtp_layer_model(n, gen):
    """An (n+1)-layer model whose last layer, hc_head and norm are the MTP module's."""
    cfg = transformers.DeepseekV4Config(**dict(
        V4, num_hidden_layers=n + 1, layer_types=V4["layer_types"] + ["sliding_attention"],
        mlp_layer_types=V4["mlp_layer_types"] + ["moe"]))
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    perturb(model, gen)
    return model


def _glue(d, eps, gen):
    glue = torch.nn.ModuleDict({"enorm": v4.DeepseekV4RMSNorm(d, eps),
                                "hnorm": v4.DeepseekV4RMSNorm(d, eps),
                                "e_proj": torch.nn.Linear(d, d, bias=False),
                                "h_proj": torch.nn.Linear(d, d, bias=False)})
    with torch.no_grad():
        for name, p in glue.named_parameters():
            scale = 0.3 if "norm" in name else 0.1
            p.copy_(scale * torch.randn(p.shape, generator=gen) + ("norm" in name))
    return glue


def mtp_logits(main, mtp_model, glue, ids):
    """Logits of the MTP module: hooks take main's last streams into layer n."""
    n = main.config.num_hidden_layers
    streams = {}
    h1 = main.model.layers[n - 1].register_forward_hook(
        lambda m, args, out: streams.__setitem__("h", out))
    logits_of(main, ids)
    h1.remove()
    nxt = torch.cat([torch.tensor(ids[:, 1:]), torch.zeros_like(torch.tensor(ids[:, :1]))], 1)

    def feed(module, args, kwargs):
        e = glue["enorm"](main.model.embed_tokens(nxt))                      # (B, T, d)
        x = glue["e_proj"](e).unsqueeze(2) + glue["h_proj"](glue["hnorm"](streams["h"]))
        return (x,) + args[1:], kwargs

    h2 = mtp_model.model.layers[n].register_forward_pre_hook(feed, with_kwargs=True)
    out = logits_of(mtp_model, ids)
    h2.remove()
    return out


def main(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    cfg = transformers.DeepseekV4Config(**dict(V4, num_nextn_predict_layers=1))
    main_model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    perturb(main_model, gen)
    n = cfg.num_hidden_layers
    mtp_model = _mtp_layer_model(n, gen)
    shared = {k: v for k, v in main_model.state_dict().items()
              if not k.startswith(("model.hc_head.", "model.norm."))}
    missing, _ = mtp_model.load_state_dict(shared, strict=False)
    assert all(k.startswith((f"model.layers.{n}.", "model.hc_head.", "model.norm."))
               for k in missing), missing
    glue = _glue(cfg.hidden_size, cfg.rms_norm_eps, gen)
    ids = tokens()
    result = {"tokens": ids, "main": logits_of(main_model, ids),
              "mtp": mtp_logits(main_model, mtp_model, glue, ids)}

    model_dir = os.path.join(out_dir, "model")
    main_model.save_pretrained(model_dir, safe_serialization=True)
    mtp_model.save_pretrained(os.path.join(out_dir, "mtp_layer_model"), safe_serialization=True)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    for name, t in load_file(os.path.join(out_dir, "mtp_layer_model",
                                          "model.safetensors")).items():
        if name.startswith(f"model.layers.{n}."):
            tensors["mtp.0." + name[len(f"model.layers.{n}."):]] = t
        elif name.startswith("model.hc_head.hc_"):
            tensors["mtp.0.hc_head_" + name[len("model.hc_head.hc_"):]] = t
        elif name == "model.norm.weight":
            tensors["mtp.0.norm.weight"] = t
    for name in _GLUE:
        tensors[f"mtp.0.{name}.weight"] = glue[name].weight.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True)
    assert not info["missing_keys"], info
    result["reloaded"] = logits_of(reloaded.eval(), ids)
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    np.savez(os.path.join(out_dir, "reference.npz"), **result)


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    main(sys.argv[1])
