"""Checks of a Hugging Face `config.json` before anything is built, and the
data defaults a converted workdir gets.

`check_hf_config` names every missing or unsupported field in one `UserError`
line, so a user fixes the file once instead of meeting one `KeyError` at a time.
`fit_data_to_model` keeps the default `--data.seq_len` within the model's
positions (a flag the user gave is kept, and checked by `Experiment`).

Example:
    >>> check_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    Traceback (most recent call last):
    UserError: config.json: missing vocab_size, hidden_size, ... A LlamaForCausalLM ...
"""

from __future__ import annotations

from typing import Any

from deepseek_tf.config import DataConfig
from deepseek_tf.errors import UserError

#: Fields every supported architecture needs (positive integers).
COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "max_position_embeddings")
#: Extra fields of DeepSeek's multi-head latent attention.
MLA = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
#: Extra fields of an MoE config (n_routed_experts > 0).
MOE = ("num_experts_per_tok", "moe_intermediate_size")
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new")


def _rope_params(hf: dict) -> dict:
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    params.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in params})
    return params


def _unsupported(hf: dict, arch: str) -> list[str]:
    """`field=value (why)` for every setting we cannot represent exactly."""
    out = []
    act = hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        out.append(f"hidden_act={act!r} (silu, gelu_pytorch_tanh are supported)")
    if hf.get("mlp_bias"):
        out.append("mlp_bias=true")
    if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
        out.append("attention_bias=true (Llama puts biases on o_proj too)")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        out.append("use_sliding_window=true")
    if arch == "DeepseekV2ForCausalLM" and hf.get("n_routed_experts"):
        method = hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            out.append(f"topk_method={method!r} (greedy, group_limited_greedy are supported)")
    rope = _rope_params(hf)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "yarn", "llama3"):
        out.append(f"rope type {kind!r} (default, yarn, llama3 are supported)")
    if rope.get("truncate") is False:
        out.append("rope_parameters.truncate=false")
    return out


def _missing(hf: dict, arch: str) -> tuple[list[str], list[str]]:
    """(absent or null required fields, `field=value` of those not positive integers)."""
    from deepseek_tf.convert.hf_v4 import REQUIRED as V4_REQUIRED
    need = list(V4_REQUIRED if arch == "DeepseekV4ForCausalLM" else COMMON)
    if arch.startswith("Deepseek") and arch != "DeepseekV4ForCausalLM":
        need += MLA + (MOE if hf.get("n_routed_experts") else ())
    rope = _rope_params(hf)
    if (rope.get("rope_type") or rope.get("type")) == "llama3":
        need += [k for k in ("low_freq_factor", "high_freq_factor") if rope.get(k) is None]
    missing, invalid = [], []
    for name in need:
        value: Any = hf.get(name, rope.get(name))
        if value is None:
            missing.append(name)
        elif name in COMMON + MLA + MOE + V4_REQUIRED and (isinstance(value, bool) or
                                             not isinstance(value, int) or value <= 0):
            invalid.append(f"{name}={value!r}")
    return missing, invalid


def check_hf_config(hf: dict, arch: str, where: str = "config.json") -> None:
    """Raises one UserError naming every missing or unsupported field of `hf`.

    Args:
      hf: the parsed config.json.
      arch: its architecture (`hf_config.architecture_of`, already checked).
      where: the file, for the message.
    """
    missing, invalid = _missing(hf, arch)
    unsupported = _unsupported(hf, arch)
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if invalid:
        problems.append(f"not a positive integer: {', '.join(invalid)}")
    if unsupported:
        problems.append(f"unsupported {'; '.join(unsupported)}")
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}. A {arch} config.json as "
                        f"transformers' save_pretrained writes it has every field needed.")


def fit_data_to_model(data: DataConfig, max_positions: int, explicit=(),
                      log=print) -> DataConfig:
    """`data` with seq_len cut to the model's positions unless it was given.

    Args:
      data: the data section of the conversion's Experiment.
      max_positions: the model's max_position_embeddings.
      explicit: names of the data fields the user set (flags or flagfile).
      log: printer for the note.
    """
    if "seq_len" in explicit or data.seq_len <= max_positions:
        return data
    log(f"note: --data.seq_len defaults to the model's max_position_embeddings "
        f"{max_positions} (was {data.seq_len})")
    changes: dict[str, Any] = {"seq_len": max_positions}
    if "cutoff_len" not in explicit and data.cutoff_len > max_positions + 1:
        changes["cutoff_len"] = 0
    if "stride" not in explicit and data.stride >= max_positions:
        changes["stride"] = 0
    return data.replace(**changes)
