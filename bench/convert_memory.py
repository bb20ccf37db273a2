"""Peak memory of `python -m deepseek_tf.convert` on a sharded FP8 checkpoint.

    python bench/convert_memory.py                 # ~1 GB of FP8 shards (5, hidden 2048)
    python bench/convert_memory.py --format=bf16   # the same model stored in bf16
    python bench/convert_memory.py --smoke         # ~9 MB

Writes a synthetic DeepSeek-V3-style checkpoint (MLA + MoE, random weights; FP8
block-scaled projections with float32 `weight_scale_inv`, bf16 embeddings / norms /
router, sharded with `model.safetensors.index.json`), converts it in a child process
and reads the child's peak resident set size (`getrusage(RUSAGE_CHILDREN)`). The
baseline is the peak RSS of a child that only imports what the converter imports
(Python, TensorFlow, the package). Prints peak RSS, the baseline, the largest shard
and the total, and checks peak - baseline <= 2 x the largest shard + FIXED_MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {  # name: (ModelConfig overrides, shards)
    "full": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=7, num_attention_heads=16, q_lora_rank=512,
                  kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                  moe_intermediate_size=1024, first_k_dense_replace=1), 5),
    "smoke": (dict(vocab_size=2048, hidden_size=256, intermediate_size=512,
                   num_hidden_layers=3, num_attention_heads=4, q_lora_rank=96,
                   kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
                   moe_intermediate_size=256, first_k_dense_replace=1), 3),
}
BLOCK = (128, 128)
#: What the converter holds whatever the shard size: the model declaration's build pass
#: (each variable's initial value, transiently), the smallest part (16 MiB of float32,
#: and TF's copy of it while it is written), allocator slack. Measured with --smoke
#: (3 MB shards) on the 2-core AMD EPYC: 106 MiB.
FIXED_MB = 256


def write_checkpoint(out: str, overrides: dict, shards: int, fmt: str) -> list[int]:
    """A random checkpoint of this config in `shards` shards; returns the shard sizes."""
    from deepseek_tf.config import ModelConfig
    from deepseek_tf.convert.hf_config import hf_config_from_model
    from deepseek_tf.convert.quant import Quantization, quantize_fp8
    from deepseek_tf.convert.safetensors_io import INDEX_FILE, write_safetensors
    from deepseek_tf.convert.stream import declared_model
    from deepseek_tf.convert.weights import weight_entries

    cfg = ModelConfig(attention_type="mla", scoring_func="sigmoid", topk_method="noaux_tc",
                      max_position_embeddings=256, **overrides)
    entries = weight_entries(declared_model(cfg))
    rng = np.random.default_rng(0)
    nbytes = {"fp8": 1, "bf16": 2}[fmt]
    total = sum(int(np.prod(e.hf_shape())) * nbytes for e in entries)
    per_shard, tensors, size, sizes, weight_map = total // shards + 1, {}, 0, [], {}

    def flush():
        name = f"model-{len(sizes) + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(out, name), tensors)
        weight_map.update({k: name for k in tensors})
        sizes.append(os.path.getsize(os.path.join(out, name)))
        tensors.clear()

    for e in entries:
        w = rng.standard_normal(e.hf_shape(), dtype=np.float32) * 0.02
        quantize = fmt == "fp8" and len(w.shape) == 2 and e.name.endswith("proj.weight")
        if quantize:
            tensors[e.name], tensors[e.name + "_scale_inv"] = quantize_fp8(w, BLOCK)
        else:
            tensors[e.name] = w.astype(ml_dtypes.bfloat16)
        size += w.size * nbytes
        if size >= per_shard:
            flush()
            size = 0
    if tensors:
        flush()
    hf = hf_config_from_model(cfg)
    if fmt == "fp8":
        hf["quantization_config"] = Quantization("fp8", BLOCK).to_hf()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f)
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    return sizes


def peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    """(peak RSS in MiB of the child running `cmd`, its stdout); one child per process:
    RUSAGE_CHILDREN is the maximum over waited-for children."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, proc.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a ~9 MB checkpoint")
    p.add_argument("--format", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--dir", default="", help="work directory (default: a temp dir)")
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:  # a child: one measurement, printed as JSON
        cmd = ([sys.executable, "-c", "import tensorflow, deepseek_tf.convert.stream, "
                "deepseek_tf.model"] if args.measure == "baseline" else
               [sys.executable, "-m", "deepseek_tf.convert", f"--hf_dir={args.dir}/hf",
                f"--workdir={args.dir}/wd"])
        t = time.time()
        mb, out = peak_rss_mb(cmd)
        print(json.dumps({"peak_mb": mb, "seconds": time.time() - t, "log": out[-400:]}))
        return
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import cpu_summary
    print(f"machine: {cpu_summary()}; load average {os.getloadavg()[0]:.1f}")
    work = args.dir or tempfile.mkdtemp(prefix="convert_memory-")
    overrides, shards = SIZES["smoke" if args.smoke else "full"]
    shutil.rmtree(os.path.join(work, "wd"), ignore_errors=True)
    os.makedirs(os.path.join(work, "hf"), exist_ok=True)
    sizes = write_checkpoint(os.path.join(work, "hf"), overrides, shards, args.format)
    results = {}
    for what in ("baseline", "convert"):  # each in its own process: its own RUSAGE max
        out = subprocess.run([sys.executable, __file__, f"--measure={what}", f"--dir={work}"],
                             capture_output=True, text=True, check=True).stdout
        results[what] = json.loads(out.strip().splitlines()[-1])
    largest, total = max(sizes) / 2**20, sum(sizes) / 2**20
    peak, base = results["convert"]["peak_mb"], results["baseline"]["peak_mb"]
    ratio = (peak - base) / largest
    bound = 2 * largest + FIXED_MB
    print(f"{args.format} checkpoint: {len(sizes)} shards, total {total:,.1f} MiB, largest "
          f"shard {largest:,.1f} MiB")
    print(f"convert: peak RSS {peak:,.1f} MiB = baseline {base:,.1f} MiB (Python + TensorFlow "
          f"+ package imports) + {peak - base:,.1f} MiB = {ratio:.2f} x the largest shard; "
          f"bound 2 x largest shard + {FIXED_MB} MiB fixed = {bound:,.1f} MiB; "
          f"{results['convert']['seconds']:.1f} s (load average {os.getloadavg()[0]:.1f})")
    print(f"RESULT {json.dumps({'peak_mb': peak, 'baseline_mb': base, 'largest_mb': largest, 'total_mb': total, 'ratio': ratio, 'bound_mb': bound})}")
    if not args.dir:
        shutil.rmtree(work)
    if peak - base > bound:
        raise SystemExit(f"peak RSS above baseline {peak - base:,.1f} MiB > {bound:,.1f} MiB")


if __name__ == "__main__":
    main()
