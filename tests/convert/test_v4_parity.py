"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM, both ways.

The subprocess of test_hf_parity builds two tiny random V4 models (every attention
type, hash-routed and top-k MoE, sqrtsoftplus and sigmoid routers, swiglu_limit
active, legacy config keys in the second); we convert them and compare logits: on
T = 20 (compressed entries and a partial tail), on a left-padded batch, and on
T = 3 (below the window and every compress rate). Then we export to HF and
transformers reloads the export with no missing or unexpected tensor.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.convert import convert_hf
from deepseek_tf.export import export, load_workdir
from tests.convert.test_hf_parity import TOL, _torch, build_reference, quiet
from tests.helpers import tiny

NAMES = ("deepseek_v4", "deepseek_v4_sigmoid")
PAD = 5  # hf_reference.PAD


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return build_reference(tmp_path_factory, NAMES)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    hf_dir, _ = reference
    out = {}
    for name in NAMES:
        wd = str(tmp_path_factory.mktemp(f"wd-{name}") / "wd")
        convert_hf(str(hf_dir / name), wd, Experiment(data=tiny.data_config()), log=quiet)
        out[name] = (wd, load_workdir(wd)[0])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_long_short_and_left_padded(reference, converted, name):
    _, ref = reference
    model = converted[name][1]
    assert model.config.attention_type == "v4" and model.config.hc_mult > 1
    tokens = ref["tokens"]
    diff = float(np.abs(model(tf.constant(tokens, tf.int32)).numpy() - ref[name]).max())
    short = model(tf.constant(tokens[:, :3], tf.int32)).numpy()
    short_diff = float(np.abs(short - ref[f"{name}_short"]).max())
    padded = tokens.copy()
    padded[0, :PAD] = 0
    seg = np.ones_like(padded)
    seg[0, :PAD] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    ours = model(tf.constant(padded, tf.int32), segment_ids=tf.constant(seg, tf.int32),
                 positions=tf.constant(pos, tf.int32)).numpy()
    pad_diff = float(np.abs(ours - ref[f"{name}_padded"])[seg.astype(bool)].max())
    print(f"parity {name}: max-abs-diff {diff:.2e}, T=3 {short_diff:.2e}, "
          f"left-padded {pad_diff:.2e}")
    assert max(diff, short_diff, pad_diff) <= TOL, (diff, short_diff, pad_diff)


def test_hf_export_reloads_in_transformers(reference, converted, tmp_path):
    _, ref = reference
    for name in NAMES:
        out = tmp_path / name
        export(converted[name][1], load_workdir(converted[name][0])[1], "hf", str(out),
               log=quiet)
        np.save(out / "tokens.npy", ref["tokens"])
        assert json.loads((out / "config.json").read_text())["architectures"] == [
            "DeepseekV4ForCausalLM"]
    _torch("reload", *(str(tmp_path / n) for n in NAMES))
    for name in NAMES:
        info = json.loads((tmp_path / name / "loading_info.json").read_text())
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys",
                                             "mismatched_keys")), info
        reloaded = np.load(tmp_path / name / "reloaded.npz")["logits"]
        assert float(np.abs(reloaded - ref[name]).max()) <= TOL, name
