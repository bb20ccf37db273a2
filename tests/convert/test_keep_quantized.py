"""Keep-quantized workdirs: an FP8 release converted to int8 weights + scales, run with
on-the-fly dequantization, fine-tuned with LoRA on the frozen int8 base and merged; and
`--convert.dtype=bfloat16` storage.

The FP8 shards come from our own export (`export --format=hf --quantize=fp8`) of a tiny
random DeepSeek-V3-style model (MLA + MoE + shared expert), so no torch process runs.
"""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment, LoraConfig
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.safetensors_io import SafetensorsDir
from deepseek_tf.convert.weights import export_tensors
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.export.hf import export_hf
from deepseek_tf.layers.quantized import (FLOAT_LAYERS, dequantize_int8, int8_config,
                                         quantize_int8)
from deepseek_tf.train.loop import train
from deepseek_tf.workdir import load_workdir
from deepseek_tf.workdir_files import LOG_FILE
from tests.convert.test_hf_parity import _cli
from tests.helpers import tiny
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731
IDS = tf.constant([[256, 5, 17, 99, 3, 200, 41, 7, 64]])
#: int8 with one scale per output channel moves each weight by at most max|w| / 254 of
#: its channel; on this random model (init stddev 0.2) the logits' RMS error against the
#: float conversion of the same FP8 files is ~1.3% of their RMS. The bound leaves room for
#: that, not for a wrong scale or a transposed one (those give errors of order 100%).
REL_RMS_BOUND = 0.06


def _rel_rms(a, b) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def _ckpt_bytes(workdir: str) -> int:
    d = os.path.join(workdir, "checkpoints")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if ".data-" in f)


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    """(dir, FP8 HF shards, float workdir, int8 workdir) of one tiny MLA + MoE model."""
    root = tmp_path_factory.mktemp("keepq")
    # One MLA + MoE (shared expert) block: every int8 kind in the least time.
    src, _ = make_workdir(str(root / "src"), "mla_moe", seed=4, num_hidden_layers=1,
                          first_k_dense_replace=0)
    model, exp = load_workdir(src)
    hf = str(root / "hf")
    export_hf(model, exp, hf, log=quiet, quantize="fp8", shard_mb=0.05)
    flt, q8 = str(root / "float"), str(root / "int8")
    convert_hf(hf, flt, Experiment(data=tiny.data_config()), log=quiet)
    convert_hf(hf, q8, Experiment(data=tiny.data_config()), log=quiet,
               keep_quantized="int8", part_bytes=20_000)  # several parts: slices of scales
    convert_hf(hf, str(root / "bf16"), Experiment(data=tiny.data_config()), log=quiet,
               dtype="bfloat16")
    return root, hf, flt, q8


@pytest.fixture(scope="module")
def loaded(fp8_release):
    """{"float": (model, exp), "int8": (model, exp)} of the two conversions."""
    root, _, flt, q8 = fp8_release
    return {"float": load_workdir(flt), "int8": load_workdir(q8),
            "bf16": load_workdir(str(root / "bf16"))}


def test_int8_workdir_runs_close_to_the_float_one_and_is_smaller(fp8_release, loaded):
    _, _, flt, q8 = fp8_release
    fmodel, _ = loaded["float"]
    qmodel, qexp = loaded["int8"]
    assert qexp.model.weight_quantization == "int8"
    rel = _rel_rms(qmodel(IDS).numpy(), fmodel(IDS).numpy())
    print(f"int8 vs float logits: RMS error {rel:.4f} of their RMS; checkpoint bytes "
          f"{_ckpt_bytes(q8):,} vs {_ckpt_bytes(flt):,}")
    assert 0 < rel <= REL_RMS_BOUND, rel
    reader = tf.train.load_checkpoint(os.path.join(q8, "checkpoints"))
    dtypes = reader.get_variable_to_dtype_map()
    int8 = [k for k, d in dtypes.items() if d == tf.int8]
    assert any("gate_up_proj" in k for k in int8) and any("kv_b_proj" in k for k in int8)
    assert not any("lm_head" in k or "embed_tokens" in k for k in int8)
    # The embeddings and head (vocab 264 x 32 each) stay float in this tiny model; the
    # quantized projections and experts take a quarter of their float32 bytes.
    assert _ckpt_bytes(q8) < 0.7 * _ckpt_bytes(flt)
    stored = json.load(open(os.path.join(q8, "convert.json")))["stored_as"]
    assert stored == "int8"
    # An HF export of the int8 workdir writes the dequantized weights.
    kv = qmodel.blocks[0].self_attn.kv_b_proj
    moe = qmodel.moe_layers[0]
    tensors = export_tensors(qmodel)
    np.testing.assert_allclose(tensors["model.layers.0.self_attn.kv_b_proj.weight"],
                               dequantize_int8(kv._kernel.numpy(), kv.kernel_scale.numpy()).T,
                               rtol=1e-6)
    f = moe.moe_intermediate_size
    np.testing.assert_allclose(tensors["model.layers.0.mlp.experts.3.up_proj.weight"],
                               dequantize_int8(moe.gate_up_proj.numpy(),
                                               moe.gate_up_proj_scale.numpy())[3, :, f:].T,
                               rtol=1e-6)


def test_convert_dtype_bfloat16_stores_and_runs_bfloat16(fp8_release, loaded):
    root, _, flt, _ = fp8_release
    model, exp = loaded["bf16"]
    assert exp.model.weight_dtype == "bfloat16"
    kinds = {v.path.split("/", 1)[1]: v.dtype for v in model.variables}
    assert kinds["layers_0/self_attn/kv_b_proj/kernel"] == "bfloat16"
    assert kinds["layers_0/mlp/gate_up_proj"] == "bfloat16"
    assert kinds["layers_0/mlp/gate/kernel"] == "float32"  # routers and norms stay float32
    assert kinds["norm/scale"] == "float32"
    dtypes = tf.train.load_checkpoint(str(root / "bf16" / "checkpoints")) \
        .get_variable_to_dtype_map()
    assert dtypes["model/layers_0/mlp/down_proj/.ATTRIBUTES/VARIABLE_VALUE"] == tf.bfloat16
    assert _ckpt_bytes(str(root / "bf16")) < 0.6 * _ckpt_bytes(flt)
    # bfloat16 weights and compute (8 mantissa bits): ~1% RMS error on these logits.
    rel = _rel_rms(model(IDS).numpy(), loaded["float"][0](IDS).numpy())
    print(f"bfloat16 vs float32 logits: RMS error {rel:.4f} of their RMS")
    assert 0 < rel <= REL_RMS_BOUND, rel


def test_generate_runs_on_the_int8_workdir(loaded):
    from deepseek_tf.generate import Generator
    model, _ = loaded["int8"]
    prompt = [256, 5, 17, 99]
    tokens, _ = Generator(model, max_length=8).generate([prompt], [4], max_new_tokens=4)
    out = tokens.numpy()[0].tolist()
    seq = prompt + out[:3]  # cached (absorbed MLA) decoding equals full recomputation
    full = model(tf.constant([seq])).numpy()[0]
    assert [int(full[len(prompt) - 1 + i].argmax()) for i in range(4)] == out


def test_lora_on_the_int8_base_trains_adapters_only_and_merges_requantized(
        fp8_release, stdlib_data):
    from deepseek_tf.tools.merge_lora import merge
    root, _, _, q8 = fp8_release
    _, data_dir, _ = stdlib_data
    model_cfg = Experiment.load(os.path.join(q8, "config.json")).model
    exp = tiny.experiment(data_dir, model=model_cfg.to_dict(), optim={"learning_rate": 3e-2},
                          train={"steps": 4, "log_every": 1, "checkpoint_every": 4,
                                 "eval_every": 0, "init_from": q8, "finetuning_type": "lora"})
    exp = dataclasses.replace(exp, lora=LoraConfig(rank=2, alpha=4.0, targets="all"))
    wd = str(root / "lora")
    train(exp, wd, log=quiet)
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(wd, LOG_FILE)))
              if r.get("kind", "train") == "train" and "loss" in r]
    assert losses[-1] < losses[0], losses
    base = tf.train.load_checkpoint(os.path.join(q8, "checkpoints"))
    tuned = tf.train.load_checkpoint(os.path.join(wd, "checkpoints"))
    for k, d in base.get_variable_to_dtype_map().items():  # the int8 base bitwise untouched
        if k.startswith("model/") and d == tf.int8:
            np.testing.assert_array_equal(tuned.get_tensor(k), base.get_tensor(k), err_msg=k)
    assert os.path.exists(os.path.join(wd, "adapter", "adapter.safetensors"))

    out = str(root / "merged")
    merge(out, workdir=wd, log=quiet)
    assert Experiment.load(os.path.join(out, "config.json")).model.weight_quantization == "int8"
    # Dequantize -> merge -> requantize: each merged int8 kernel is within half a step of
    # base + (alpha / r) A B, per output channel; the routed experts stay bitwise.
    merged = tf.train.load_checkpoint(os.path.join(out, "checkpoints"))
    adapter = SafetensorsDir(os.path.join(wd, "adapter"))
    for layer in ("layers_0/self_attn/kv_b_proj", "layers_0/mlp/shared_experts/down_proj"):
        key = f"model/{layer}/%s/.ATTRIBUTES/VARIABLE_VALUE"
        a, b = (adapter.load(f"{layer}/lora_kernel_{x}") for x in "ab")
        want = dequantize_int8(base.get_tensor(key % "_kernel"),
                               base.get_tensor(key % "kernel_scale")) + 4.0 / 2 * a @ b
        q, scale = merged.get_tensor(key % "_kernel"), merged.get_tensor(key % "kernel_scale")
        assert q.dtype == np.int8
        assert np.all(np.abs(dequantize_int8(q, scale) - want) <= 0.5 / scale + 1e-6), layer
        assert not np.array_equal(q, base.get_tensor(key % "_kernel")), layer  # it learned
    key = "model/layers_0/mlp/gate_up_proj/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(merged.get_tensor(key), base.get_tensor(key))


def test_an_int8_base_trains_only_lora_from_weights(fp8_release):
    from deepseek_tf.train.finetune import check_quantized_base
    _, _, _, q8 = fp8_release
    model_cfg = Experiment.load(os.path.join(q8, "config.json")).model
    for train_cfg, words in (({"init_from": q8}, "finetuning_type=lora"),
                             ({"finetuning_type": "lora"}, "--train.init_from")):
        exp = tiny.experiment("data", model=model_cfg.to_dict(), train=train_cfg)
        with pytest.raises(ConfigError, match=words):
            check_quantized_base(exp, resuming=False)
    check_quantized_base(tiny.experiment("data", model=model_cfg.to_dict(), train={
        "init_from": q8, "finetuning_type": "lora"}), resuming=False)
    bf16 = model_cfg.replace(weight_quantization="none", weight_dtype="bfloat16")
    with pytest.raises(ConfigError, match="weight_dtype=bfloat16"):
        check_quantized_base(tiny.experiment("data", model=bf16.to_dict(), train={
            "init_from": q8}), resuming=False)


def test_keep_quantized_bad_values_are_one_error_line(fp8_release, tmp_path):
    _, hf, _, _ = fp8_release
    with pytest.raises(UserError, match="keep_quantized"):
        convert_hf(hf, str(tmp_path / "x"), Experiment(data=tiny.data_config()), log=quiet,
                   keep_quantized="fp4")
    with pytest.raises(UserError, match="--convert.dtype"):
        convert_hf(hf, str(tmp_path / "x"), Experiment(data=tiny.data_config()), log=quiet,
                   dtype="float16")
    proc = _cli("deepseek_tf.convert", f"--hf_dir={hf}", f"--workdir={tmp_path / 'y'}",
                "--convert.keep_quantized=int4")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "int4" in lines[0], lines
    assert not os.path.exists(tmp_path / "y" / "config.json")


def test_int8_values_are_keras_int8_quantization_of_the_float_conversion(loaded):
    """Streaming (slice by slice, expert by expert) gives bitwise what Keras'
    `Dense.quantize("int8")` gives on the whole float kernel: one scheme. (Last: it
    quantizes a layer of the shared float model in place.)"""
    fmodel, _ = loaded["float"]
    qmodel, _ = loaded["int8"]
    qvars = {v.path.split("/", 1)[1]: v.numpy() for v in qmodel.variables}
    dense = [layer for layer in fmodel._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.Dense) and layer.name not in FLOAT_LAYERS]
    assert len(dense) == 8  # q_a, q_b, kv_a, kv_b, o; the shared expert's gate, up, down
    for layer in dense:
        path = layer._kernel.path.split("/", 1)[1]                  # .../q_a_proj/kernel
        q, scale = quantize_int8(layer._kernel.numpy())
        np.testing.assert_array_equal(q, qvars[path], err_msg=path)
        np.testing.assert_array_equal(scale, qvars[path + "_scale"], err_msg=path)
    layer = dense[3]  # Keras' own quantize (each call costs a gc.collect: one layer)
    path = layer._kernel.path.split("/", 1)[1]
    layer.quantize("int8", config=int8_config())
    np.testing.assert_array_equal(layer._kernel.numpy(), qvars[path])
    np.testing.assert_array_equal(layer.kernel_scale.numpy(), qvars[path + "_scale"])
    moe = fmodel.moe_layers[0]
    q, s = quantize_int8(moe.gate_up_proj.numpy())
    qmoe = qmodel.moe_layers[0]
    np.testing.assert_array_equal(qmoe.gate_up_proj.numpy(), q)
    np.testing.assert_array_equal(qmoe.gate_up_proj_scale.numpy(), s)
