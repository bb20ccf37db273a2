"""`python -m deepseek_tf.train` / `prepare` as a user runs them: help, bad input, exit codes."""

import os
import re
import subprocess
import sys

import pytest

from deepseek_tf.config import Experiment, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _error_lines(proc):
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def test_help_explains_every_flag():
    proc = run("deepseek_tf.train", "--help")
    assert proc.returncode == 0
    for name in ("--workdir", "--model.hidden_size", "--model.num_key_value_heads",
                 "--data.seq_len", "--optim.learning_rate", "--train.grad_accum_steps",
                 "--train.jit_compile", "--train.strategy", "--train.collective_timeout",
                 "--train.precision", "--train.initial_loss_scale", "--train.remat",
                 "--model.attention_dropout", "--model.hidden_dropout", "--[no]optim.fused"):
        assert name + ":" in proc.stdout, name
    assert "May change when resuming" in proc.stdout
    assert "42 preempted (SIGTERM)" in proc.stdout


@pytest.mark.parametrize("flag,needle", [
    ("--model.hidden_size=abc", "hidden_size"),
    ("--model.num_attention_heads=7", "must divide"),
    ("--model.hidden_act=relu", "hidden_act"),
    ("--train.stepz=3", "stepz"),
    ("--optim.learning_rate=-1", "learning_rate"),
    ("--flagfile=configs/no-such.flags", "Unable to open flagfile: [Errno 2] No such file"),
])
def test_bad_flag_is_one_line_and_exit_2(flag, needle, tmp_path):
    proc = run("deepseek_tf.train", f"--workdir={tmp_path / 'w'}", flag)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "ERROR" not in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written


def test_contradicting_workdir_config_is_refused_and_untouched(tmp_path):
    Experiment(model=ModelConfig(hidden_size=64, num_attention_heads=4)).save(
        str(tmp_path / "config.json"))
    before = (tmp_path / "config.json").read_bytes()
    proc = run("deepseek_tf.train", f"--workdir={tmp_path}", "--model.hidden_size=128")
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and "contradicts" in errors[0] and "--workdir" in errors[0]
    assert (tmp_path / "config.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_unreadable_data_directory_is_refused(tmp_path):
    (tmp_path / "data").mkdir()  # exists, but no metadata.json
    proc = run("deepseek_tf.train", f"--workdir={tmp_path / 'w'}",
               f"--data.data_dir={tmp_path / 'data'}")
    assert proc.returncode == 2
    errors = _error_lines(proc)
    assert len(errors) == 1 and "metadata.json" in errors[0], proc.stderr
    assert not (tmp_path / "w").exists()


def test_prepare_cli_writes_data(tmp_path):
    proc = run("deepseek_tf.prepare", f"--data.data_dir={tmp_path / 'd'}",
               "--data.max_samples=5", "--data.val_size=1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"documents in +5\n", proc.stdout), proc.stdout
    assert re.search(r"prepared \d+ documents", proc.stdout)
    assert (tmp_path / "d" / "metadata.json").exists()


def test_two_commands_from_a_jsonl_folder_to_a_training_run(tmp_path):
    from deepseek_tf.data.corpus import stdlib_documents
    from tests.helpers.corpora import write_jsonl

    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [d.data.decode() for d in stdlib_documents(30) if d.data.strip()]
    write_jsonl(folder / "part-0.jsonl", [{"text": t} for t in texts[::2]])
    write_jsonl(folder / "part-1.jsonl", [{"text": t} for t in texts[1::2]])
    data, run_dir = tmp_path / "data", tmp_path / "run"
    proc = run("deepseek_tf.prepare", "--flagfile=configs/tiny.flags",
               f"--data.inputs={folder}", f"--data.output_dir={data}")
    assert proc.returncode == 0, proc.stderr
    assert "prepare report" in proc.stdout and "tokens out" in proc.stdout
    proc = run("deepseek_tf.train", "--flagfile=configs/tiny.flags", f"--data.data_dir={data}",
               f"--workdir={run_dir}", "--train.steps=2", "--train.batch_size=2",
               "--train.eval_every=0", "--train.eval_steps=1", "--train.log_every=1",
               "--train.jit_compile=false")
    assert proc.returncode == 0, proc.stderr
    assert "done: step 2" in proc.stdout
    assert (run_dir / "tokenizer" / "tokenizer_config.json").exists()



def test_a_data_dir_that_does_not_exist_is_refused_not_filled_with_the_corpus(tmp_path):
    typo = tmp_path / "data" / "my_corpsu"
    proc = run("deepseek_tf.train", "--flagfile=configs/tiny.flags", f"--data.data_dir={typo}",
               f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_lines(proc) == [proc.stderr.strip().splitlines()[-1]]
    assert f"--data.data_dir={typo} does not exist" in _error_lines(proc)[0]
    assert not typo.exists() and not (tmp_path / "w").exists()


def test_a_template_flag_that_contradicts_the_prepared_data_is_refused(tmp_path):
    # (Not given, they are taken from the data: tests/test_chat_flows.py.)
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.prepare import prepare
    from tests.helpers.corpora import write_jsonl

    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"}
                                       for i in range(8)])
    data = str(tmp_path / "sft")
    prepare(DataConfig(inputs=str(tmp_path / "a.jsonl"), format="alpaca", template="plain",
                       val_size=2), data, log=lambda *_: None)
    # A given flag that contradicts metadata.json: one line, nothing written.
    proc = run("deepseek_tf.train", "--flagfile=configs/tiny.flags", f"--data.data_dir={data}",
               f"--workdir={tmp_path / 'w'}", "--data.template=chatml")
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1, proc.stderr
    assert "--data.template='chatml' contradicts" in proc.stderr and "'plain'" in proc.stderr
    assert not (tmp_path / "w").exists()
