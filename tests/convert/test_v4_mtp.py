"""DeepSeek-V4's multi-token prediction against DeepSeek's MTP block on transformers'
own V4 layers (v4_mtp_reference.py: transformers has V4 but no MTP), through convert
(transformers' names and DeepSeek's), export and back, and in training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.safetensors_io import SafetensorsDir, write_safetensors
from deepseek_tf.export import load_workdir
from deepseek_tf.export.hf import export_hf
from tests.helpers.v4_released import release_name
from tests.convert.test_hf_parity import ROOT, TOL, _env, quiet
from tests.helpers import tiny

REFERENCE = os.path.join(ROOT, "tests", "convert", "v4_mtp_reference.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF dir with mtp.0.*, reference outputs, (our converted model, its Experiment))."""
    out = tmp_path_factory.mktemp("v4mtp")
    proc = subprocess.run([sys.executable, REFERENCE, str(out)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wd = str(out / "wd")
    convert_hf(str(out / "model"), wd, Experiment(data=tiny.data_config()), log=quiet)
    return out / "model", dict(np.load(out / "reference.npz")), load_workdir(wd)[:2]


def _outputs(model, tokens):
    logits, aux = model(tf.constant(tokens, tf.int32), return_aux=True)
    return logits.numpy(), aux["mtp_logits"][0].numpy()


def test_mtp_logits_match_deepseeks_block_on_transformers_layers(reference):
    _, ref, (model, _) = reference
    assert len(model.mtp) == 1 and model.config.num_nextn_predict_layers == 1
    assert model.mtp[0].block.self_attn.layer_type == "sliding_attention"
    assert model.mtp[0].block.mlp.gate.tid2eid is None        # learned top-k, not hashed
    # transformers loads the checkpoint with its mtp.* tensors skipped, unchanged
    np.testing.assert_array_equal(ref["reloaded"], ref["main"])
    main, mtp = _outputs(model, ref["tokens"])
    diff, mtp_diff = np.abs(main - ref["main"]).max(), np.abs(mtp - ref["mtp"]).max()
    print(f"V4 MTP parity: main {diff:.2e}, mtp {mtp_diff:.2e}")
    assert max(diff, mtp_diff) <= TOL, (diff, mtp_diff)
    assert np.abs(ref["mtp"] - ref["main"]).max() > 0.1     # the MTP head is its own


def test_export_writes_deepseeks_mtp_names_and_they_convert_back(reference, tmp_path):
    """Our HF export holds the source's tensors (mtp.0.* included) with equal values;
    the same tensors under DeepSeek's own names (`embed.weight`, `layers.*`) convert
    to the same main and MTP logits."""
    src, ref, (model, exp) = reference
    out = export_hf(model, exp, str(tmp_path / "hf"), log=quiet)
    ours, theirs = SafetensorsDir(out), SafetensorsDir(str(src))
    assert set(ours.names()) == set(theirs.names())
    for name in theirs.names():
        np.testing.assert_allclose(ours.load(name), theirs.load(name), rtol=0, atol=0)
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 1
    release = tmp_path / "release"
    os.makedirs(release)
    write_safetensors(str(release / "model.safetensors"),
                      {release_name(n): theirs.load(n) for n in theirs.names()})
    (release / "config.json").write_text((src / "config.json").read_text())
    convert_hf(str(release), str(tmp_path / "wd"), Experiment(data=tiny.data_config()),
               log=quiet)
    again = load_workdir(str(tmp_path / "wd"))[0]
    for a, b in zip(_outputs(again, ref["tokens"]), _outputs(model, ref["tokens"])):
        np.testing.assert_array_equal(a, b)
