"""The chat template travels with the data, end to end, as the README's commands run:
prepare alpaca data with `--data.template=plain`, LoRA-train on it from a base run
(`python -m deepseek_tf.train`, a few steps), then `generate --chat` on the run and on
`merge_lora --base --adapter`'s workdir. The base says deepseek3: a template lost on the
way shows up as other tokens."""

import json
import os
import subprocess
import sys

import pytest

from deepseek_tf.config import DataConfig
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.tools import merge_lora
from deepseek_tf.workdir import load_experiment, load_run_tokenizer, load_workdir
from tests.helpers.corpora import write_jsonl
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is 2 + 3?", "Reverse the word cat."]
quiet = lambda *_: None  # noqa: E731


def _cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _chat_cli(workdir, prompts_file):
    """`generate --chat` with the run's own template (no --template): greedy completions."""
    out = _cli("deepseek_tf.generate", f"--workdir={workdir}", "--chat",
               f"--input_file={prompts_file}", "--max_new_tokens=6", "--jit_compile=false")
    return [json.loads(line)["completion"] for line in out.stdout.splitlines()
            if line.startswith("{")]


def _chat_here(workdir, template):
    """The same greedy generation in this process, with a named template."""
    from deepseek_tf.generate import text as gtext
    from deepseek_tf.generate.run import run_batches

    model, exp = load_workdir(workdir)
    tok, tmpl = load_run_tokenizer(workdir, exp), TEMPLATES[template]
    ids = [gtext.prompt_ids(p, tok, tmpl) for p in PROMPTS]
    rows = run_batches(model, tok, ids, max(len(i) for i in ids) + 6, gtext.stop_ids(tok, tmpl),
                       gtext.stop_strings(tok, tmpl), max_new_tokens=6, temperature=0.0)
    return [r["completion"] for r in rows]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flows")
    base, _ = make_workdir(str(tmp / "base"), "gqa", seed=5)  # data: text / deepseek3
    write_jsonl(tmp / "alpaca.jsonl", [{"instruction": f"Add {i} and {i + 1}.",
                                        "output": str(2 * i + 1)} for i in range(24)])
    data = str(tmp / "sft")
    prepare(DataConfig(inputs=str(tmp / "alpaca.jsonl"), format="alpaca", template="plain",
                       seq_len=64, val_size=4), data, log=quiet)
    run = str(tmp / "run")
    # Neither --data.format nor --data.template: they come from the prepared data.
    _cli("deepseek_tf.train", f"--workdir={run}", f"--train.init_from={base}",
         f"--data.data_dir={data}", "--data.seq_len=64", "--train.finetuning_type=lora",
         "--lora.rank=2", "--lora.targets=all", "--train.steps=3", "--train.batch_size=2",
         "--train.log_every=1", "--train.eval_every=0", "--train.eval_steps=1",
         "--train.checkpoint_every=3", "--train.jit_compile=false")
    prompts = tmp / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p, "reference": "5"} for p in PROMPTS])
    return base, run, prompts


def test_train_records_the_prepared_format_and_template_and_chat_uses_it(lora_run):
    from deepseek_tf.evaluate import evaluate_workdir

    base, run, prompts = lora_run
    data = load_experiment(run).data
    assert (data.format, data.template) == ("alpaca", "plain")
    got = _chat_cli(run, prompts)
    assert got == _chat_here(run, "plain")
    assert got != _chat_here(run, "deepseek3")  # the test can tell templates apart
    result = evaluate_workdir(run, [str(prompts)], task="generate", max_new_tokens=2,
                              log=quiet, output=os.path.join(os.path.dirname(run), "e.json"))
    assert result["template"] == "plain"


def test_merge_base_and_adapter_keeps_the_adapter_runs_template(lora_run, tmp_path):
    base, run, prompts = lora_run
    out = merge_lora.merge(str(tmp_path / "merged"), base=base,
                           adapter=os.path.join(run, "adapter"), log=quiet)
    exp = load_experiment(out)
    assert (exp.data.format, exp.data.template) == ("alpaca", "plain")
    assert load_experiment(base).data.template == "deepseek3"
    assert exp.train.finetuning_type == "full" and exp.model == load_experiment(base).model
    assert _chat_cli(out, prompts) == _chat_here(run, "plain")
