"""A whole DeepSeek-V4 release in its quantized layout: FP4 routed experts, FP8 elsewhere.

One torch subprocess (`fp8_reference.py v4`) saves a tiny DeepseekV4 with transformers,
re-quantizes it as DeepSeek releases V4 (experts FP4-packed with float8_e8m0fnu scales
per 32 inputs, the other projections FP8 in 16x16 blocks, so that partial blocks occur),
writes 3 shards with an index and runs transformers on the weights dequantized by its own
code. We convert the shards (streaming, in parts) and compare.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.safetensors_io import INDEX_FILE, SafetensorsDir, ShardFile, \
    write_safetensors
from deepseek_tf.export import load_workdir
from deepseek_tf.generate import Generator
from tests.convert.test_fp8 import quantized_release
from tests.convert.test_hf_parity import quiet
from tests.helpers import tiny
from tests.helpers.v4_released import release_name

#: Our logits vs transformers on the same dequantized weights.
TOL = 1e-4
#: e2m1 keeps one mantissa bit (a weight moves by up to a quarter of its group's scale
#: step), and moved router scores pick other experts: on this random tiny model the
#: logits' RMS error against the unquantized model is 24% of their RMS. The bound leaves
#: room for that, not for a wrong nibble order or scale (those give ~100%).
REL_RMS_BOUND = 0.5


@pytest.fixture(scope="module")
def fp4(tmp_path_factory):
    """(dir with fp4/, fp4-dequant/, reference.npz; our model converted from fp4/)."""
    out, wd = quantized_release(tmp_path_factory, "fp4", (16, 16), 20_000)
    return out, wd, load_workdir(wd)[0]


def test_fp4_v4_shards_convert_to_what_transformers_computes(fp4):
    out, wd, model = fp4
    files = SafetensorsDir(str(out / "fp4"))
    assert len(files.shards) == 3
    assert files.info("model.layers.2.ffn.experts.1.w2.weight")["dtype"] == "I8"
    assert files.info("model.layers.2.ffn.experts.1.w2.weight_scale_inv")["dtype"] == "F8_E8M0"
    assert files.info("model.layers.2.attn.wq_b.weight")["dtype"] == "F8_E4M3"
    ref = np.load(out / "reference.npz")
    ours = model(tf.constant(ref["tokens"], tf.int32)).numpy()
    diff = float(np.abs(ours - np.load(out / "fp4-dequant" / "logits.npy")).max())
    err = ours - ref["deepseek_v4_fp4"]
    rel = float(np.sqrt((err ** 2).mean() / (ref["deepseek_v4_fp4"] ** 2).mean()))
    print(f"fp4 v4: max-abs-diff {diff:.2e} to transformers on the dequantized weights; RMS "
          f"error {rel:.3f} of the unquantized model's logits")
    assert diff <= TOL, diff
    assert 0 < rel <= REL_RMS_BOUND, rel
    record = json.loads((Path(wd) / "convert.json").read_text())
    assert record["quantization"] == "fp8" and record["weight_block_size"] == [16, 16]


def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(fp4):
    """Ours from the KV cache (`Generator`); theirs by full recomputation."""
    out, _, model = fp4
    prompts = np.load(out / "fp4-dequant" / "prompts.npy", allow_pickle=True)
    theirs = np.load(out / "fp4-dequant" / "generated.npy")
    gen = Generator(model, max_length=max(len(p) for p in prompts) + theirs.shape[1])
    for prompt, expect in zip(prompts, theirs):
        ids, _ = gen.generate([list(prompt)], [len(prompt)], max_new_tokens=len(expect))
        assert ids.numpy()[0].tolist() == expect.tolist()


def test_deepseeks_own_v4_tensor_names_convert_to_the_same_model(fp4, tmp_path):
    """DeepSeek's V4 shards name tensors as its reference code does (`embed.weight`,
    `layers.*`, scales `*.scale`): the same weights under those names convert to the
    same logits. (The MTP layer's `mtp.*` names: tests/convert/test_v4_mtp.py.)"""
    out, _, model = fp4
    src, dst = out / "fp4", tmp_path / "release"
    os.makedirs(dst)
    index = json.loads((src / INDEX_FILE).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        f = ShardFile(str(src / shard))
        write_safetensors(str(dst / shard), {release_name(n): f.load(n) for n in f.names()})
    weight_map = {release_name(k): v for k, v in index["weight_map"].items()}
    (dst / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    assert "layers.2.ffn.experts.1.w2.scale" in weight_map and "embed.weight" in weight_map
    notes = []
    convert_hf(str(dst), str(tmp_path / "wd"), Experiment(data=tiny.data_config()),
               log=notes.append)
    assert any("DeepSeek's own V4 tensor names" in n for n in notes), notes
    ids = tf.constant(np.load(out / "reference.npz")["tokens"], tf.int32)
    np.testing.assert_array_equal(load_workdir(str(tmp_path / "wd"))[0](ids).numpy(),
                                  model(ids).numpy())
