"""The perplexity filter of prepare: documents of random characters are dropped, clean
ones kept, the count in report.json; a filter model without a limit is refused."""

import json
import os
import random

import pytest

from deepseek_tf.config import DataConfig
from deepseek_tf.data.prepare import prepare
from deepseek_tf.errors import ConfigError
from deepseek_tf.scoring import perplexity_scorer
from tests.helpers.corpora import write_jsonl

quiet = lambda *_: None  # noqa: E731


def test_noisy_documents_are_dropped_and_counted(trained_moe_run, tmp_path):
    filter_model = trained_moe_run  # an MLA + MoE model that learned the corpus' bytes
    rng = random.Random(0)
    clean = [f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(8)]
    noisy = ["".join(chr(rng.randrange(33, 0x2000)) for _ in range(60)) for _ in range(4)]
    docs = [{"text": t} for pair in zip(clean, noisy + [None] * 4) for t in pair if t]
    inputs = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = DataConfig(inputs=inputs, seq_len=64, val_size=1, ppl_filter_model=filter_model,
                     ppl_max=300.0)
    scores = perplexity_scorer(cfg)(clean + noisy)
    assert max(scores[:8]) < 300 < min(scores[8:]), scores
    out = str(tmp_path / "data")
    meta = prepare(cfg, out, log=quiet, scorer=perplexity_scorer(cfg))
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["removed"]["perplexity"] == 4 and report["counts"]["documents_out"] == 8
    assert report["ppl_filter"] == {"model": filter_model, "max": 300.0}
    assert meta["settings"]["ppl_max"] == 300.0
    with pytest.raises(ConfigError, match="go together"):
        DataConfig(ppl_filter_model=filter_model)
