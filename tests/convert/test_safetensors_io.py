"""Our numpy safetensors reader/writer against the reference `safetensors` package."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deepseek_tf.convert.safetensors_io import SafetensorsDir, write_safetensors
from deepseek_tf.errors import UserError


def test_round_trip_with_the_reference_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32),
               "b": rng.integers(0, 9, size=(7,)).astype(np.int64),
               "c.half": rng.normal(size=(2, 2, 2)).astype(np.float16)}
    write_safetensors(str(tmp_path / "ours.safetensors"), tensors)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(theirs[k], tensors[k])
    (tmp_path / "ref").mkdir()
    save_file(tensors, str(tmp_path / "ref" / "model.safetensors"))
    ours = SafetensorsDir(str(tmp_path / "ref"))
    assert ours.names() == sorted(tensors) and ours.shape("a.weight") == (3, 5)
    for k in tensors:
        np.testing.assert_array_equal(ours.load(k), tensors[k])
    ours.close()


def test_bfloat16_reads_without_torch(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    write_safetensors(str(tmp_path / "m.safetensors"), {"w": x.astype(ml_dtypes.bfloat16)})
    got = SafetensorsDir(str(tmp_path)).load("w")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match="pickle files, which are never loaded"):
        SafetensorsDir(str(tmp_path))
