"""evaluate: metrics on fixtures with known values, the three tasks, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from deepseek_tf.evaluate import evaluate_workdir, read_records
from deepseek_tf.evaluate import metrics
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda *_: None  # noqa: E731


def test_bleu_rouge_exact_match_on_known_values():
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == \
        pytest.approx(100.0)
    # All n-gram precisions 1, brevity penalty exp(1 - 6/4).
    assert metrics.bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(
        100 * math.exp(1 - 6 / 4), abs=1e-3)
    assert metrics.bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    r = metrics.rouge(["the cat sat"], ["the cat"])
    assert r["rouge1"] == pytest.approx(80.0)  # P 2/3, R 1
    assert r["rouge2"] == pytest.approx(100 * 2 * 0.5 / 1.5)  # P 1/2, R 1
    assert metrics.exact_match([" 42\n", "cba", "1"], ["42", "abc", "1"]) == \
        pytest.approx(200 / 3)


def test_classification_scores_on_known_values():
    s = metrics.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["micro_f1"] == pytest.approx(0.75)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path, model = make_workdir(str(tmp_path_factory.mktemp("eval-wd")), "gqa", seed=1)
    return path, model


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_lm_task_matches_a_direct_computation(workdir, tmp_path):
    import tensorflow as tf

    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    path, model = workdir
    texts = ["hello world", "def f(x):\n    return x"]
    data = _write(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    res = evaluate_workdir(path, [data], task="lm", log=quiet)
    tok, nll, n = ByteTokenizer(), 0.0, 0
    for t in texts:
        ids = np.asarray(tok.encode(t, add_bos=True, add_eos=True))
        logp = tf.nn.log_softmax(model(ids[None])[0]).numpy()
        nll -= sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
        n += len(ids) - 1
    assert res["metrics"]["tokens"] == n
    assert res["metrics"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    saved = json.load(open(os.path.join(path, "eval", "lm-t.json")))
    assert saved["metrics"] == res["metrics"]


def test_generate_task_scores_the_greedy_answers(workdir, tmp_path):
    path, _ = workdir
    rows = [{"instruction": "Reverse", "input": w, "output": w[::-1]}
            for w in ("abc", "hello", "xyz")]
    data = _write(tmp_path / "g.jsonl", rows)
    res = evaluate_workdir(path, [data], task="auto", template="plain", max_new_tokens=6,
                           log=quiet)
    assert res["task"] == "generate" and len(res["samples"]) == 3
    preds = [s["prediction"] for s in res["samples"]]
    assert {"bleu", "rouge1", "rouge2", "rougeL"} <= set(res["metrics"])
    # Greedy answers are deterministic: references that are two of them (padded with
    # whitespace, which exact match strips) and one other answer score 2 of 3, by hand.
    rows = [dict(r, output=o) for r, o in zip(rows, [f" {preds[0]}\n", f"{preds[1]}  ",
                                                     preds[2] + "#not-it"])]
    again = evaluate_workdir(path, [_write(tmp_path / "g2.jsonl", rows)], task="generate",
                             template="plain", max_new_tokens=6, log=quiet)
    assert [s["prediction"] for s in again["samples"]] == preds
    assert again["metrics"]["exact_match"] == pytest.approx(100 * 2 / 3)


def test_classify_picks_the_most_likely_label(workdir, tmp_path):
    import tensorflow as tf

    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    path, model = workdir
    rows = [{"text": "good movie", "label": "pos"}, {"text": "bad movie", "label": "neg"},
            {"text": "fine", "label": "pos"}]
    data = _write(tmp_path / "c.jsonl", rows)
    res = evaluate_workdir(path, [data], log=quiet)
    assert res["task"] == "classify"
    tok = ByteTokenizer()
    for s in res["samples"]:  # the label's summed log-likelihood, by hand
        for label, score in s["log_likelihoods"].items():
            p = tok.encode(s["text"], add_bos=True, add_eos=False)
            ids = np.asarray(list(p) + list(tok.encode(label, add_bos=False, add_eos=False)))
            logp = tf.nn.log_softmax(model(ids[None])[0]).numpy()
            want = sum(logp[i - 1, ids[i]] for i in range(len(p), len(ids)))
            assert score == pytest.approx(want, abs=1e-4)
        assert s["prediction"] == max(s["log_likelihoods"], key=s["log_likelihoods"].get)


def test_read_records_reports_bad_json(tmp_path):
    from deepseek_tf.errors import UserError
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserError, match="line 2"):
        read_records([str(tmp_path / "bad.jsonl")])


def test_cli_help_and_bad_input(workdir, tmp_path):
    path, _ = workdir
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "deepseek_tf.evaluate", *a], cwd=ROOT, capture_output=True,
        text=True, timeout=120)
    out = run("--help")
    assert out.returncode == 0 and "--task" in out.stdout
    out = run(f"--workdir={path}", f"--data.inputs={tmp_path}/missing.jsonl")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot read --data.inputs")
