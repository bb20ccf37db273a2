"""The embedded fine-tuning demo's data: instructions with exact answers, no download.

Four task families, each answer a function of the question (so exact match is a fair
score): addition / subtraction of small numbers, reversing a short lowercase word,
sorting a few digits, counting one letter in a short string. Every question is
unique; train and held-out splits are disjoint by question (a held-out prompt is never
seen in training). Alpaca format: `instruction`, `input`, `output`.

    python -m deepseek_tf.data.demo --output_dir=data/sft-demo
    # -> data/sft-demo/train.jsonl, heldout.jsonl, pairs.jsonl (chosen/rejected, for DPO)

Example:
    >>> train, heldout = make_splits(num_train=100, num_heldout=20, seed=0)
    >>> sorted(train[0])
    ['input', 'instruction', 'output']
"""

from __future__ import annotations

import json
import os
import random

from deepseek_tf.atomic import atomic_open

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randrange(0, 50), rng.randrange(0, 50)
    if rng.random() < 0.5:
        return {"instruction": "Add the numbers.", "input": f"{a} + {b}",
                "output": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"instruction": "Subtract.",
            "input": f"{a} - {b}", "output": str(a - b)}


def _reverse(rng: random.Random) -> dict:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return {"instruction": "Reverse the word.", "input": word,
            "output": word[::-1]}


def _sort(rng: random.Random) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    return {"instruction": "Sort the digits.",
            "input": " ".join(map(str, digits)), "output": " ".join(map(str, sorted(digits)))}


def _count(rng: random.Random) -> dict:
    letter = rng.choice("abc")
    text = "".join(rng.choice("abcd") for _ in range(rng.randint(4, 8)))
    return {"instruction": f"Count the letter {letter}.",
            "input": text, "output": str(text.count(letter))}


TASKS = (_arithmetic, _reverse, _sort, _count)


def make_splits(num_train: int = 12000, num_heldout: int = 200,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records, tasks in equal shares, no question in both."""
    rng = random.Random(seed)
    seen, rows = set(), []
    total = num_train + num_heldout
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ValueError(f"cannot draw {total} distinct questions; ask for fewer.")
        row = TASKS[len(rows) % len(TASKS)](rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:num_train], rows[num_train:]


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible but wrong answer (for preference pairs): off by a little."""
    out = row["output"]
    if out.lstrip("-").isdigit():
        return str(int(out) + rng.choice([-2, -1, 1, 2]))
    if " " in out:  # sorted digits: swap two different neighbours
        parts = out.split()
        i = next((k for k in range(len(parts) - 1) if parts[k] != parts[k + 1]), None)
        if i is None:
            return out + " 0"
        parts[i], parts[i + 1] = parts[i + 1], parts[i]
        return " ".join(parts)
    return row["input"] if row["input"] != out else out + "x"  # reversal: the unreversed word


def make_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs of `rows`: chosen = the right answer, rejected = `wrong_answer`."""
    rng = random.Random(seed)
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
             "rejected": wrong_answer(r, rng)} for r in rows]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_demo(output_dir: str, num_train: int = 12000, num_heldout: int = 200,
               seed: int = 0) -> tuple[str, str]:
    """Writes train.jsonl, heldout.jsonl and pairs.jsonl (preference pairs of the training
    questions, for DPO) into `output_dir`; returns the paths of the first two."""
    os.makedirs(output_dir, exist_ok=True)
    train, heldout = make_splits(num_train, num_heldout, seed)
    paths = os.path.join(output_dir, "train.jsonl"), os.path.join(output_dir, "heldout.jsonl")
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], heldout)
    write_jsonl(os.path.join(output_dir, "pairs.jsonl"), make_pairs(train[:2000], seed))
    return paths


def main(argv):
    from absl import flags

    from deepseek_tf.errors import UserError

    FLAGS = flags.FLAGS
    try:
        paths = write_demo(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_heldout, FLAGS.seed)
    except OSError as e:
        raise UserError(f"cannot write the demo data into --output_dir={FLAGS.output_dir}: "
                        f"{e.strerror}; pass a writable directory.") from e
    print(f"wrote {FLAGS.num_train} training records to {paths[0]} and "
          f"{FLAGS.num_heldout} held-out records to {paths[1]}")


if __name__ == "__main__":
    from absl import flags

    from deepseek_tf import flags as dflags
    flags.DEFINE_string("output_dir", "data/sft-demo", "Directory for train.jsonl and "
                        "heldout.jsonl.")
    flags.DEFINE_integer("num_train", 12000, "Training records.", lower_bound=1)
    flags.DEFINE_integer("num_heldout", 200, "Held-out records (questions never in train). "
                         "More leaves train.jsonl as it is and extends heldout.jsonl "
                         "(its first records are the smaller count's).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)
    dflags.run(main)
