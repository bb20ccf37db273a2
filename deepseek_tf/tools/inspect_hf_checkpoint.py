"""Summarise a Hugging Face safetensors checkpoint from its headers (no tensor is loaded).

    python -m deepseek_tf.tools.inspect_hf_checkpoint --hf_dir=DeepSeek-V3
    python -m deepseek_tf.tools.inspect_hf_checkpoint --hf_dir=DeepSeek-V3 --list --filter=layers.3.

--hf_dir takes a model directory (config.json + model.safetensors, or the shards that
model.safetensors.index.json names). Prints the shards and their sizes, the bytes
and tensor counts per dtype, the parameter count stored (an FP4-packed byte holds two
values; `weight_scale_inv` scales are counted apart), the quantization_config, and,
for an architecture deepseek_tf converts, total / active parameters per token from
config.json. With --list, one line per tensor: name, dtype, shape, shard.
"""

import json
import os

from absl import flags

from deepseek_tf import flags as dflags  # noqa: E402

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def define_flags():
    """The command line's flags (defined only when run as a script)."""
    flags.DEFINE_string("hf_dir", "", "A Hugging Face model directory.")
    flags.DEFINE_bool("list", False, "Also print one line per tensor.")
    flags.DEFINE_string("filter", "", "With --list: only tensors whose name contains this.")


def inspect(hf_dir: str) -> dict:
    """{"shards": [(file, bytes)], "tensors": [(name, dtype, shape, file)], "dtypes":
    {dtype: [count, bytes]}, "params", "scale_params", "config"} from headers only."""
    from deepseek_tf.convert.quant import SCALE_SUFFIX
    from deepseek_tf.convert.safetensors_io import SafetensorsDir

    files = SafetensorsDir(hf_dir)  # index, missing and truncated shards checked here
    out = {"shards": [(os.path.basename(s.path), s.size) for s in files.shards],
           "tensors": [], "dtypes": {}, "params": 0, "scale_params": 0, "config": {}}
    fp4 = False
    config = os.path.join(hf_dir, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            out["config"] = json.load(f)
        fp4 = (out["config"].get("quantization_config") or {}).get("expert_dtype") == "fp4"
    for name in files.names():
        info = files.info(name)
        n = 1
        for d in info["shape"]:
            n *= d
        count, nbytes = out["dtypes"].get(info["dtype"], [0, 0])
        out["dtypes"][info["dtype"]] = [count + 1, nbytes + n * BYTES.get(info["dtype"], 0)]
        if name.endswith(SCALE_SUFFIX):
            out["scale_params"] += n
        else:  # packed FP4: two values per int8 byte
            out["params"] += 2 * n if fp4 and info["dtype"] in ("I8", "U8") else n
        out["tensors"].append((name, info["dtype"], info["shape"],
                               os.path.basename(files.index[name].path)))
    return out


def model_counts(config: dict) -> dict | None:
    """deepseek_tf's analytic total / active parameters of a config.json it converts."""
    from deepseek_tf.convert.hf_config import model_config_from_hf
    from deepseek_tf.errors import UserError
    from deepseek_tf.params import count_parameters
    try:
        cfg, _ = model_config_from_hf(config)
    except (UserError, KeyError, TypeError, ValueError):
        return None
    return count_parameters(cfg.replace(
        num_nextn_predict_layers=int(config.get("num_nextn_predict_layers") or 0)))


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def main(argv):
    F = flags.FLAGS
    r = inspect(F.hf_dir)
    cfg = r["config"]
    print(f"{F.hf_dir}: {(cfg.get('architectures') or ['?'])[0]}, {len(r['shards'])} "
          f"shard(s), {_gib(sum(s for _, s in r['shards']))}")
    for name, size in r["shards"]:
        print(f"  {name:<40} {_gib(size):>14}")
    print("dtypes:")
    for dtype, (count, nbytes) in sorted(r["dtypes"].items(), key=lambda kv: -kv[1][1]):
        print(f"  {dtype:<8} {count:>8,} tensors {_gib(nbytes):>14}")
    print(f"parameters stored: {r['params']:,}"
          + (f" (+ {r['scale_params']:,} scale values)" if r["scale_params"] else ""))
    if cfg.get("quantization_config"):
        print(f"quantization_config: {json.dumps(cfg['quantization_config'])}")
    counts = model_counts(cfg) if cfg else None
    if counts:
        print(f"model: {counts['total']:,} total, {counts['active']:,} active per token"
              + (f", MTP {counts['mtp_total']:,}" if counts["mtp_total"] else ""))
    else:
        print("model: total/active not computed (an architecture deepseek_tf does not "
              "convert)")
    if F.list:
        for name, dtype, shape, shard in r["tensors"]:
            if F.filter in name:
                print(f"{name:<64} {dtype:<8} {str(tuple(shape)):<18} {shard}")


def entry():
    """The console script `deepseek-tf-inspect-hf-checkpoint`."""
    define_flags()
    dflags.run(main, required=("hf_dir",))


if __name__ == "__main__":
    entry()
