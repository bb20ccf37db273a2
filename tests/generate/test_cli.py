"""`python -m deepseek_tf.generate` and `export --format=saved_model` as a user runs
them: streamed text equal to the in-process generator, chat prompts, batches, help,
and one clear line for bad input."""

import json
import os
import subprocess
import sys

import pytest

from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.generate import Generator
from deepseek_tf.generate.text import prompt_ids, stop_ids
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("gen") / "run"), "mla_moe")


def _expected(model, ids, n, stops=(257,)):
    tok = ByteTokenizer()
    out, count = Generator(model, len(ids) + n, stop_ids=stops, pad_id=tok.pad_id).generate(
        [ids], [len(ids)], max_new_tokens=n)
    return tok.decode([t for t in out.numpy()[0, :count[0]] if t < 256])


def test_streams_the_generated_text_and_a_speed_line(workdir):
    path, model = workdir
    proc = run("deepseek_tf.generate", f"--workdir={path}", "--prompt=Once upon",
               "--max_new_tokens=24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = ByteTokenizer()
    assert proc.stdout.rstrip("\n") == _expected(model, tok.encode("Once upon", add_eos=False), 24)
    assert "tokens/s" in proc.stderr.splitlines()[-1]


def test_chat_wraps_the_prompt_in_the_runs_template(workdir, tmp_path):
    path, model = workdir
    proc = run("deepseek_tf.generate", f"--workdir={path}", "--prompt=Hi", "--chat",
               "--template=plain", "--max_new_tokens=10", "--temperature=0.8", "--seed=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok, template = ByteTokenizer(), TEMPLATES["plain"]
    ids = prompt_ids("Hi", tok, template)
    assert tok.decode(ids[1:]) == "User: Hi\n\nAssistant: "
    out, n = Generator(model, len(ids) + 10, stop_ids=stop_ids(tok, template),
                       pad_id=tok.pad_id).generate([ids], [len(ids)], max_new_tokens=10,
                                                   temperature=0.8, seed=3)
    assert proc.stdout.rstrip("\n") == tok.decode([t for t in out.numpy()[0, :n[0]] if t < 256])


def test_unseeded_sampling_differs_between_runs(workdir):
    path, _ = workdir
    procs = [run("deepseek_tf.generate", f"--workdir={path}", "--prompt=Once", "--temperature=1",
                 "--max_new_tokens=24", "--jit_compile=false") for _ in range(2)]
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-2000:]
    assert procs[0].stdout != procs[1].stdout


def test_help_lists_the_sampling_flags():
    proc = run("deepseek_tf.generate", "--help")
    assert proc.returncode == 0
    for name in ("--workdir", "--prompt", "--[no]chat", "--input_file", "--output_file",
                 "--max_new_tokens", "--temperature", "--top_k", "--top_p", "--seed"):
        assert name + ":" in proc.stdout, name


@pytest.mark.parametrize("args,needle", [
    (["--prompt=x"], "--workdir is required"),
    (["--workdir=/nonexistent", "--prompt=x"], "no config.json"),
    (["--prompt=x", "--input_file=a.jsonl"], "exactly one of --prompt or --input_file"),
    (["--prompt=x", "--top_p=1.5"], "--top_p=1.5 must be in (0, 1]"),
    (["--prompt=" + "x" * 200, "--max_new_tokens=64"], "exceeds the cache"),
    (["--prompt=x", "--chat", "--template=nope"], "--template='nope' is not one of"),
    (["--prompt=x", "--max_new_tokens=0"], "max_new_tokens"),
])
def test_bad_input_gives_one_line_and_exit_2(workdir, args, needle):
    path, _ = workdir
    if not any(a.startswith("--workdir") for a in args) and args != ["--prompt=x"]:
        args = [f"--workdir={path}", *args]
    proc = run("deepseek_tf.generate", *args)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert needle in errors[0] and "Traceback" not in proc.stderr


def test_bad_prompt_file_names_the_line(workdir, tmp_path):
    path, _ = workdir
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    proc = run("deepseek_tf.generate", f"--workdir={path}", f"--input_file={bad}")
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr


def test_alpaca_output_is_an_sft_dataset_prepare_reads_as_is(tmp_path):
    """Sequence-level distillation: a teacher's answers become SFT records."""
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.prepare import prepare
    from tests.helpers.corpora import read_split, write_jsonl

    path, _ = make_workdir(str(tmp_path / "teacher"), "gqa")  # the cheapest to build
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"Add {i} and 2.",
                                                  "input": "Be brief."} for i in range(6)])
    out = tmp_path / "sft.jsonl"
    proc = run("deepseek_tf.generate", f"--workdir={path}", f"--input_file={prompts}",
               "--chat", "--max_new_tokens=6", f"--output_file={out}",
               "--output_format=alpaca", "--jit_compile=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all(set(r) == {"instruction", "output"} and r["output"].strip()
                           for r in records)
    assert records[0]["instruction"] == "Add 0 and 2.\nBe brief."
    assert f"[alpaca: {len(records)} records;" in proc.stderr
    meta = prepare(DataConfig(inputs=str(out), format="alpaca", template="plain", seq_len=64,
                              val_size=0), str(tmp_path / "data"), log=lambda *_: None)
    assert meta["kind"] == "sft" and len(read_split(str(tmp_path / "data"), meta)) == len(records)


def test_export_saved_model_cli_and_its_errors(workdir, tmp_path):
    path, _ = workdir
    out = tmp_path / "models" / "deepseek" / "1"
    proc = run("deepseek_tf.export", f"--workdir={path}", "--format=saved_model",
               f"--output={out}", "--max_length=48")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "saved_model.pb").exists() and "jit_compile: auto -> " in proc.stdout
    xla = "jit_compile: auto -> true" in proc.stdout  # the default: timed on this machine
    assert ("signatures: generate_ids, generate_ids_no_xla, score, serving_default, "
            "serving_default_no_xla" if xla else "signatures: generate_ids, score, "
            "serving_default") in proc.stdout
    again = run("deepseek_tf.export", f"--workdir={path}", "--format=saved_model",
                f"--output={out}")
    assert again.returncode == 2 and "write a new version directory" in again.stderr
    wrong = run("deepseek_tf.export", f"--workdir={path}", "--format=hf",
                f"--output={tmp_path / 'hf'}", "--quantize=int8")
    assert wrong.returncode == 2 and "--format=hf takes --quantize=none or fp8" in wrong.stderr
