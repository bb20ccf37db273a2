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
    # A label only ever predicted counts in the macro mean with F1 0 (zero_division=0).
    s = metrics.classification_scores(["a", "a"], ["a", "z"])
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0) / 2) and s["accuracy"] == 0.5


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


def test_rouge_and_bleu_score_chinese_and_keep_english_scores():
    from rouge_score import rouge_scorer
    r = metrics.rouge(["猫坐在"], ["猫坐在垫子上"])  # one token per character: P 1, R 1/2
    assert r["rouge1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert r["rougeL"] == pytest.approx(r["rouge1"])
    assert metrics.rouge(["猫坐在垫子上"], ["猫坐在垫子上"])["rouge2"] == pytest.approx(100.0)
    assert metrics.rouge(["Кошка сидит"], ["кошка сидит на коврике"])["rouge1"] == \
        pytest.approx(100 * 2 * 0.5 / 1.5)  # Cyrillic words, case folded
    assert metrics.bleu(["猫坐在垫子上"], ["猫坐在垫子上"]) == pytest.approx(100.0)
    assert 0 < metrics.bleu(["猫坐在垫子"], ["猫坐在垫子上"]) < 100
    # English: exactly rouge-score's default tokenizer.
    preds = ["The cat sat on the mat!", "A quick-brown fox, 42 times.", "no overlap"]
    refs = ["the cat was on a mat", "a quick brown fox jumped 42 times", "something else"]
    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = metrics.rouge(preds, refs)
    for name in ours:
        want = 100 * np.mean([default.score(r, p)[name].fmeasure for p, r in zip(preds, refs)])
        assert ours[name] == pytest.approx(want)


def _label_score(model, prompt, label_ids):
    """log p(label | prompt), summed over the label's tokens, by hand."""
    import tensorflow as tf
    ids = np.asarray(list(prompt) + list(label_ids))
    logp = tf.nn.log_softmax(model(ids[None])[0]).numpy()
    return sum(logp[i - 1, ids[i]] for i in range(len(prompt), len(ids)))


def test_classify_keeps_labels_whole_and_cuts_long_texts_from_the_left(workdir, tmp_path):
    """With --max_length=16 a 30-byte text leaves no room for the labels: they are still
    scored whole (the text loses its beginning, BOS kept), summed or per token."""
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    path, model = workdir
    text = "this review is far too long to fit"
    rows = [{"text": text, "label": "neg"}, {"text": "ok", "label": "positive"}]
    data = _write(tmp_path / "long.jsonl", rows)
    msgs = []
    res = evaluate_workdir(path, [data], task="classify", max_length=16, log=msgs.append)
    assert res["metrics"]["truncated"] == 1
    assert any(m.startswith("1 of 2 texts were cut from the left") for m in msgs), msgs
    tok = ByteTokenizer()
    kept = [tok.bos_id] + list(tok.encode(text, add_bos=False, add_eos=False))[-(16 - 8 - 1):]
    sample = res["samples"][0]
    for label, score in sample["log_likelihoods"].items():
        ids = tok.encode(label, add_bos=False, add_eos=False)
        assert score == pytest.approx(_label_score(model, kept, ids), abs=1e-4)
        assert score < 0  # scored, not cut away
    normed = evaluate_workdir(path, [data], task="classify", max_length=16,
                              normalize="tokens", log=quiet)["samples"][0]
    for label, score in normed["mean_log_likelihoods"].items():
        assert score == pytest.approx(sample["log_likelihoods"][label] / len(label), abs=1e-5)


def test_classify_refuses_a_label_longer_than_max_length(workdir, tmp_path):
    from deepseek_tf.errors import UserError
    path, _ = workdir
    data = _write(tmp_path / "l.jsonl", [{"text": "a", "label": "x" * 20},
                                         {"text": "b", "label": "y"}])
    with pytest.raises(UserError, match="a label has 20 tokens: it does not fit"):
        evaluate_workdir(path, [data], task="classify", max_length=16, log=quiet)


def test_lm_and_classify_trace_their_scorer_once_for_every_batch_width(workdir, monkeypatch):
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.evaluate import tasks
    _, model = workdir
    made, real = [], tasks.token_scorer
    monkeypatch.setattr(tasks, "token_scorer", lambda m: made.append(real(m)) or made[-1])
    tok = ByteTokenizer()
    texts = [{"text": "a" * n} for n in (3, 9, 17, 5, 30)]  # widths 5..32, batches of 2 and 1
    tasks.lm_task(model, tok, texts, None, 32, batch_size=2)
    tasks.classify_task(model, tok, [{"text": "ab", "label": "x"}, {"text": "abcdefgh",
                                                                    "label": "yyyy"}],
                        None, 32, batch_size=3, log=quiet)
    assert len(made) == 2
    assert [f.experimental_get_tracing_count() for f in made] == [1, 1]
