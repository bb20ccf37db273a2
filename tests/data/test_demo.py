"""The fine-tuning demo's synthetic instruction data."""

import json
import subprocess
import sys

from deepseek_tf.data.demo import make_pairs, make_splits, write_demo


def _answer(row):
    q = row["input"]
    if row["instruction"].startswith("Add"):
        a, b = q.split(" + ")
        return str(int(a) + int(b))
    if row["instruction"].startswith("Subtract"):
        a, b = q.split(" - ")
        return str(int(a) - int(b))
    if row["instruction"].startswith("Reverse"):
        return q[::-1]
    if row["instruction"].startswith("Sort"):
        return " ".join(sorted(q.split()))
    letter = row["instruction"].split()[-1].rstrip(".")
    return str(q.count(letter))


def test_splits_are_exact_disjoint_and_balanced():
    train, held = make_splits(num_train=400, num_heldout=80, seed=3)
    assert len(train) == 400 and len(held) == 80
    assert all(r["output"] == _answer(r) for r in train + held)
    keys = lambda rows: {(r["instruction"], r["input"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(held) and len(keys(train)) == 400
    kinds = {r["instruction"].split()[0].rstrip(".") for r in held}
    assert kinds == {"Add", "Subtract", "Reverse", "Sort", "Count"}
    assert make_splits(50, 10, seed=3) == make_splits(50, 10, seed=3)


def test_a_larger_heldout_keeps_the_training_set_and_extends_the_heldout():
    """More held-out questions (e.g. `--num_heldout=1200` for a finer exact match of a
    `make demo` run) leave the training records as they were and keep the default
    held-out set as their first records, so a run trained on the default files is
    scored on questions it never saw."""
    train, held = make_splits(num_train=300, num_heldout=20, seed=0)
    more_train, more_held = make_splits(num_train=300, num_heldout=120, seed=0)
    assert more_train == train and more_held[:20] == held and len(more_held) == 120


def test_pairs_reject_a_wrong_answer():
    train, _ = make_splits(num_train=200, num_heldout=1)
    for p in make_pairs(train):
        assert p["chosen"] == _answer(p) and p["rejected"] != p["chosen"]


def test_cli_writes_the_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepseek_tf.data.demo",
                          f"--output_dir={tmp_path}", "--num_train=40", "--num_heldout=8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"instruction", "input", "output"}
    assert (tmp_path / "pairs.jsonl").exists()
    assert write_demo(str(tmp_path / "again"), 8, 2)[0].endswith("train.jsonl")


def test_cli_refuses_an_unwritable_output_dir_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    out = subprocess.run([sys.executable, "-m", "deepseek_tf.data.demo",
                          f"--output_dir={blocker / 'demo'}", "--num_train=4", "--num_heldout=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "--output_dir=" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert blocker.read_text() == "keep me\n"
