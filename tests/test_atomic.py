"""Atomic writes: the target is the old file or the whole new one, never a part."""

import os

import pytest

from deepseek_tf.atomic import atomic_open, atomic_write


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_write(path, "old")
    atomic_write(path, b"new bytes")
    assert open(path, "rb").read() == b"new bytes"
    assert os.listdir(tmp_path) == ["f.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f.json"]
