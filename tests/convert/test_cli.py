"""`python -m deepseek_tf.convert` / `export` as a user runs them: help and refusals."""

import os

from deepseek_tf.config import Experiment, ModelConfig
from tests.train.test_cli import _error_lines, run


def test_help_lists_the_flags():
    proc = run("deepseek_tf.convert", "--help")
    assert proc.returncode == 0
    for name in ("--hf_dir", "--workdir", "--data.seq_len", "--train.steps",
                 "--model.mtp_loss_weight"):
        assert name + ":" in proc.stdout, name
    proc = run("deepseek_tf.export", "--help")
    assert proc.returncode == 0
    assert all(n + ":" in proc.stdout for n in ("--workdir", "--format", "--output"))


def test_convert_refuses_shape_flags_and_missing_dirs(tmp_path):
    proc = run("deepseek_tf.convert", f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'w'}",
               "--model.hidden_size=64")
    assert proc.returncode == 2 and "comes from" in _error_lines(proc)[0]
    proc = run("deepseek_tf.convert", f"--hf_dir={tmp_path / 'nope'}",
               f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2 and "config.json" in _error_lines(proc)[0]
    assert not (tmp_path / "w").exists()


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    Experiment(model=ModelConfig(attention_type="hybrid", num_attention_heads=4,
                                 hidden_size=64)).save(str(tmp_path / "config.json"))
    proc = run("deepseek_tf.export", f"--workdir={tmp_path}", f"--output={tmp_path / 'o'}")
    errors = _error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1 and "hybrid" in errors[0], proc.stderr
    assert not os.path.exists(tmp_path / "o")
