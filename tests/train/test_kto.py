"""KTO: the loss equals a hand computation; a short run separates desirable from
undesirable answers; bad records are refused."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DPOConfig
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.train.kto import as_pairs, kto_loss
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.corpora import write_jsonl
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731


def test_kto_loss_equals_a_hand_computation():
    cfg = DPOConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    r, z0 = tf.constant([1.0, -2.0, 0.5]), tf.constant(0.25)
    loss = kto_loss(r, z0, tf.constant([1.0, 0.0, 0.0]), cfg).numpy()
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    want = [1.0 - sig(0.5 * (1.0 - 0.25)), 2.0 * (1.0 - sig(0.5 * (0.25 + 2.0))),
            2.0 * (1.0 - sig(0.5 * (0.25 - 0.5)))]
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_records_become_answer_and_mismatched_answer():
    recs = [{"prompt": "a", "completion": "x", "label": True},
            {"instruction": "b", "output": "y", "label": False}]
    pairs, labels = as_pairs(recs)
    assert labels == [1.0, 0.0]
    assert pairs[0] == {"prompt": "a", "chosen": "x", "rejected": "y"}
    assert pairs[1]["rejected"] == "x" and pairs[1]["instruction"] == "b"
    with pytest.raises(UserError, match="KTO record 1 needs an answer"):
        as_pairs([{"prompt": "a", "completion": "x", "label": "yes"}])


def test_kto_run_separates_desirable_from_undesirable(tmp_path):
    src, _ = make_workdir(str(tmp_path / "src"), "gqa", seed=5)
    rows = [{"instruction": f"Answer {i}", "completion": "yes" if i % 2 else "no",
             "label": bool(i % 2)} for i in range(16)]
    exp = tiny.fine_tuning(src, write_jsonl(tmp_path / "answers.jsonl", rows),
                           train={"steps": 6, "checkpoint_every": 6, "stage": "kto",
                                  "finetuning_type": "lora"})
    exp = dataclasses.replace(exp, dpo=DPOConfig(beta=0.5))
    wd = str(tmp_path / "kto")
    result = train(exp, wd, log=quiet)
    rows = [r for r in read_log(wd) if r["kind"] == "train"]
    assert rows[0]["rewards/desirable"] == 0.0 and rows[0]["kl"] == 0.0  # policy == ref
    assert rows[0]["loss"] == pytest.approx(0.5, rel=1e-6)  # 1 - sigmoid(0), both kinds
    assert rows[-1]["rewards/desirable"] > rows[-1]["rewards/undesirable"], rows[-1]
    assert result["eval"]["rewards/desirable"] > result["eval"]["rewards/undesirable"]
    with pytest.raises(ConfigError, match="KTO has its own loss"):
        train(dataclasses.replace(exp, dpo=DPOConfig(loss="simpo")), str(tmp_path / "x"),
              log=quiet)
