"""DeepSeek's released layout: FP8 block-scaled, sharded with an index, an MTP layer.

One torch subprocess (fp8_reference.py) saves a tiny DeepseekV3 with transformers,
re-quantizes it as DeepSeek releases V3 (blocks of 16x32 here, so that partial blocks
occur on both axes), splits it into 3 shards and runs transformers on the exactly
dequantized weights. We convert it (streaming, in parts) and compare. The LoRA test
re-quantizes the same model with 8x8 blocks, keeps it int8, fine-tunes, merges and
exports FP8 for transformers' own FP8 loader.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment, LoraConfig
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.safetensors_io import SafetensorsDir, ShardFile, write_safetensors
from deepseek_tf.errors import UserError
from deepseek_tf.export import load_workdir
from tests.convert.test_hf_parity import ROOT, _cli, _env, quiet
from tests.helpers import tiny

FP8_REFERENCE = os.path.join(ROOT, "tests", "convert", "fp8_reference.py")
PART_MB = 0.02  # ~35 parts: several per shard, so resuming and merging are exercised
#: Our logits vs transformers on the same dequantized weights.
TOL = 1e-4
#: FP8 e4m3 keeps 3 mantissa bits: each weight moves by up to 2^-4 of itself (plus bf16
#: rounding of the embeddings and norms), and a moved router score can pick another
#: expert. On this random tiny model the logits' RMS error against the unquantized
#: model is 14% of their RMS; the bound leaves room for that, not for a wrong scale.
REL_RMS_BOUND = 0.25


def torch_fp8(*args):
    proc = subprocess.run([sys.executable, FP8_REFERENCE, *args], capture_output=True,
                          text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def quantized_release(tmp_path_factory, kind: str, block: tuple, part_bytes: int):
    """(dir with <kind>/, <kind>-dequant/, reference.npz, workdir converted from <kind>/):
    fp8_reference.py's tiny release (`fp8`: V3 FP8; `fp4`: V4 with FP4 experts) in 3
    shards with `block` (rows, cols) FP8 blocks."""
    out = tmp_path_factory.mktemp(kind)
    torch_fp8({"fp8": "make", "fp4": "v4"}[kind], str(out), *map(str, block), "3")
    wd = str(out / "wd")
    convert_hf(str(out / kind), wd, Experiment(data=tiny.data_config()), log=quiet,
               part_bytes=part_bytes)
    return out, wd


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """(dir with fp8/, fp8-dequant/, reference.npz; workdir converted from fp8/)."""
    return quantized_release(tmp_path_factory, "fp8", (16, 32), int(PART_MB * 2**20))


def test_fp8_shards_convert_to_what_transformers_computes(fp8):
    out, wd = fp8
    ref = np.load(out / "reference.npz")
    model, _ = load_workdir(wd)
    ours = model(tf.constant(ref["tokens"], tf.int32)).numpy()
    dequantized = np.load(out / "fp8-dequant" / "logits.npy")
    diff = float(np.abs(ours - dequantized).max())
    err = ours - ref["deepseek_v3"]
    rel = float(np.sqrt((err ** 2).mean() / (ref["deepseek_v3"] ** 2).mean()))
    print(f"fp8: max-abs-diff {diff:.2e} to transformers on the dequantized weights; "
          f"RMS error {rel:.3f} of the unquantized model's logits")
    assert diff <= TOL, diff
    assert 0 < rel <= REL_RMS_BOUND, rel
    assert json.loads((Path(wd) / "convert.json").read_text())["quantization"] == "fp8"


def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(fp8):
    from deepseek_tf.generate import Generator
    out, wd = fp8
    prompts = np.load(out / "fp8-dequant" / "prompts.npy", allow_pickle=True)
    theirs = np.load(out / "fp8-dequant" / "generated.npy")
    model, _ = load_workdir(wd)
    gen = Generator(model, max_length=32)
    for prompt, expect in zip(prompts, theirs):
        tokens, _ = gen.generate([list(prompt)], [len(prompt)], max_new_tokens=len(expect))
        assert tokens.numpy()[0].tolist() == expect.tolist()


def test_the_mtp_layer_is_converted_from_its_fp8_tensors(fp8):
    out, wd = fp8
    model, exp = load_workdir(wd)
    assert exp.model.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    plain = SafetensorsDir(str(out / "fp8-dequant"))  # transformers' dequantization
    mtp = model.mtp[0]
    np.testing.assert_allclose(mtp.eh_proj.kernel.numpy(),
                               plain.load("model.layers.3.eh_proj.weight").T, atol=1e-7)
    moe = mtp.block.mlp
    f = moe.moe_intermediate_size
    np.testing.assert_allclose(moe.gate_up_proj.numpy()[5, :, f:],
                               plain.load("model.layers.3.mlp.experts.5.up_proj.weight").T,
                               atol=1e-7)


def test_row_ranges_of_fp8_and_bf16_tensors_read_as_slices_of_the_whole(fp8):
    """What a conversion reads for a tensor larger than its part (the embedding, the
    head): rows [start, stop), FP8 ones in whole blocks, equal to the same slice of the
    whole tensor (16x32 blocks: rows 16-48 are blocks 1-2; the last range a partial one)."""
    from deepseek_tf.convert.quant import Quantization
    from deepseek_tf.convert.stream import hf_value
    out, _ = fp8
    files = SafetensorsDir(str(out / "fp8"))
    quant = Quantization.from_hf(json.loads((out / "fp8" / "config.json").read_text()))
    for name, rows in (("model.layers.1.self_attn.kv_b_proj.weight", (16, 48)),
                       ("model.layers.1.self_attn.kv_b_proj.weight", (64, 80)),
                       ("lm_head.weight", (7, 290))):
        whole = hf_value(files, name, quant, transpose=True)
        part = hf_value(files, name, quant, transpose=True, rows=rows)
        np.testing.assert_array_equal(part, whole[:, rows[0]:rows[1]], err_msg=name)


def _bad_copy(src, dst, how):
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    scale = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    shard = dst / index[scale]
    if how == "missing shard":
        os.remove(shard)
    elif how == "scale shape":
        t = ShardFile(str(shard))
        tensors = {n: t.load(n) for n in t.names()}
        tensors[scale] = np.ones((2, 2), np.float32)
        t.close()
        write_safetensors(str(shard), tensors)
    elif how == "quant method":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"]["quant_method"] = "bitsandbytes"
        (dst / "config.json").write_text(json.dumps(cfg))
    else:  # truncated
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 100)
    return dst


BAD = {"missing shard": "names shard model-00002-of-00003.safetensors, which is missing",
       "scale shape": "kv_b_proj.weight_scale_inv has shape [2, 2], but a [80, 16] weight "
                      "with weight_block_size [16, 32] needs [5, 1]",
       "quant method": "quant_method='bitsandbytes' is not supported",
       "truncated": "is truncated"}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_checkpoints_are_one_line_and_leave_nothing_complete(fp8, tmp_path, how):
    out, _ = fp8
    bad = _bad_copy(out / "fp8", tmp_path / "bad", how)
    with pytest.raises(UserError) as e:
        convert_hf(str(bad), str(tmp_path / "wd"), Experiment(data=tiny.data_config()),
                   log=quiet)
    assert BAD[how] in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "wd" / "config.json").exists()
    if how == "truncated":  # and through the command line: exit 2, one error line
        proc = _cli("deepseek_tf.convert", f"--hf_dir={bad}", f"--workdir={tmp_path / 'w2'}")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / "w2" / "config.json").exists()


def _ckpt_files(wd):
    d = os.path.join(wd, "checkpoints")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
            if f.startswith("ckpt-0.")}


def test_a_killed_conversion_resumes_to_the_same_bytes(fp8, tmp_path):
    out, wd = fp8
    args = ["-m", "deepseek_tf.convert", f"--hf_dir={out / 'fp8'}",
            f"--workdir={tmp_path / 'wd'}", f"--part_mb={PART_MB}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = tmp_path / "wd" / "checkpoints" / ".convert" / "part-00008.done"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (tmp_path / "wd" / "config.json").exists()
    assert not (tmp_path / "wd" / "checkpoints" / "checkpoint").exists()
    done = _cli("deepseek_tf.convert", *args[2:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MiB from before" in done.stdout
    resumed, fresh = _ckpt_files(str(tmp_path / "wd")), _ckpt_files(wd)
    assert list(resumed) == list(fresh) and len(fresh) > 3
    assert all(resumed[f] == fresh[f] for f in fresh)



def _base_weights(wd):
    """{variable path: value} of a workdir's weights without the LoRA adapters."""
    from deepseek_tf.lora import _rel
    model, _ = load_workdir(wd)
    return {_rel(v.path): v.numpy() for v in model.variables if "lora_kernel" not in v.path}


#: The merged int8 model's logits against our reading of its FP8 export: e4m3 rounding of
#: every projection (3 mantissa bits, one scale per 8x8 block). Measured: an RMS error of
#: 3.1% of the logits' RMS on this tiny random model; a wrong scale or a transposed
#: weight gives errors of order 100%.
EXPORT_REL_RMS = 0.1


def test_lora_on_the_int8_kept_fp8_base_merges_and_exports_fp8_that_transformers_loads(
        fp8, stdlib_data, tmp_path):
    """The FP8 release kept quantized: convert --convert.keep_quantized=int8 (int8 +
    per-channel scales, the kept format: see README) -> LoRA trains adapters only (loss
    falls, every base weight bitwise the same) -> merge_lora (dequantize -> add
    (alpha / r) A B -> requantize int8) -> export --quantize=fp8, block-quantized with
    the source's block size, found through merge.json and --train.init_from. The
    source is the fixture's V3 re-quantized with 8x8 blocks, which divide every weight:
    transformers' fine-grained FP8 loader (accelerate installed; without a GPU it
    dequantizes each weight at load time, into float32 here, as there is no FP8 matmul
    on CPU) derives the block from the scale grid and so misreads partial blocks (the
    fixture's 16x32). Its logits of the export must equal ours within 1e-3, and so must
    those of the export dequantized by transformers' `_dequantize_fp8_weight`."""
    from deepseek_tf.export import export
    from deepseek_tf.tools.merge_lora import merge
    from deepseek_tf.train.loop import train
    from deepseek_tf.workdir_files import LOG_FILE

    out, _ = fp8
    _, data_dir, _ = stdlib_data
    src = tmp_path / "fp8-8x8"
    torch_fp8("quantize", str(out / "deepseek_v3"), str(src), "8", "8", "2")
    q8 = str(tmp_path / "int8")
    convert_hf(str(src), q8, Experiment(data=tiny.data_config()), log=quiet,
               keep_quantized="int8")
    model_cfg = Experiment.load(os.path.join(q8, "config.json")).model
    assert model_cfg.weight_quantization == "int8"
    run = str(tmp_path / "lora")
    exp = tiny.experiment(data_dir, model={**model_cfg.to_dict(), "bias_update_speed": 0.0},
                          optim={"learning_rate": 3e-2, "warmup_steps": 0},
                          train={"steps": 6, "log_every": 1, "checkpoint_every": 6,
                                 "eval_every": 0, "init_from": q8, "finetuning_type": "lora"})
    exp = dataclasses.replace(exp, lora=LoraConfig(rank=4, alpha=8.0, targets="all"))
    train(exp, run, log=quiet)  # bias_update_speed=0: the routers' balancing bias stays
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(run, LOG_FILE)))
              if r.get("kind", "train") == "train" and "loss" in r]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    before, after = _base_weights(q8), _base_weights(run)
    assert set(before) == set(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # base untouched
    merged = str(tmp_path / "merged")
    merge(merged, workdir=run, log=quiet)
    model, mexp = load_workdir(merged)
    assert mexp.model.weight_quantization == "int8"
    ref = np.load(out / "reference.npz")
    tokens = tf.constant(ref["tokens"], tf.int32)
    merged_logits = model(tokens).numpy()
    export_dir = tmp_path / "export"
    export(model, mexp, "hf", str(export_dir), log=quiet, workdir=merged, quantize="fp8",
           shard_mb=0.1)
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [8, 8]
    files = SafetensorsDir(str(export_dir))
    assert len(files.shards) > 1
    assert files.info("model.layers.1.self_attn.kv_b_proj.weight")["dtype"] == "F8_E4M3"
    assert files.shape("model.layers.1.self_attn.kv_b_proj.weight_scale_inv") == (10, 2)
    np.save(export_dir / "tokens.npy", ref["tokens"])
    torch_fp8("reload", str(export_dir))
    theirs = np.load(export_dir / "reloaded.npz")
    assert "fp8_loader" in theirs, (export_dir / "fp8_load.txt").read_text()
    back = str(tmp_path / "back")
    convert_hf(str(export_dir), back, Experiment(data=tiny.data_config()), log=quiet)
    ours = load_workdir(back)[0](tokens).numpy()
    loader = float(np.abs(ours - theirs["fp8_loader"]).max())
    dequant = float(np.abs(ours - theirs["logits"]).max())
    err = ours - merged_logits
    rel = float(np.sqrt((err ** 2).mean() / (merged_logits ** 2).mean()))
    print(f"merged FP8 export: max-abs-diff {loader:.2e} to transformers' FP8 loader, "
          f"{dequant:.2e} to its dequantization; RMS error {rel:.3f} of the merged int8 "
          f"model's logits")
    assert max(loader, dequant) <= 1e-3, (loader, dequant)
    assert 0 < rel <= EXPORT_REL_RMS, rel


def test_the_inspector_summarises_shards_from_their_headers(fp8):
    from deepseek_tf.tools import inspect_hf_checkpoint
    out, _ = fp8
    r = inspect_hf_checkpoint.inspect(str(out / "fp8"))
    plain = SafetensorsDir(str(out / "fp8-dequant"))
    assert len(r["shards"]) == 3 and {"F8_E4M3", "BF16", "F32"} <= set(r["dtypes"])
    assert r["params"] == sum(int(np.prod(plain.shape(n))) for n in plain.names())
    proc = subprocess.run([sys.executable, "-m", "deepseek_tf.tools.inspect_hf_checkpoint",
                           f"--hf_dir={out / 'fp8'}", "--list", "--filter=eh_proj"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "active per token" in proc.stdout and "F8_E4M3" in proc.stdout
    assert "model.layers.3.eh_proj.weight_scale_inv" in proc.stdout
