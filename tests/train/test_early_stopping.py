"""Early stopping on the validation loss; the best checkpoint outlives keep-last-N."""

import json
import os

import numpy as np
import tensorflow as tf

from deepseek_tf.train import loop
from deepseek_tf.train.objectives import TokenObjective
from deepseek_tf.workdir import load_workdir
from tests.helpers import tiny

quiet = lambda *_: None  # noqa: E731


def test_early_stopping_stops_and_keeps_the_best_checkpoint(stdlib_data, tmp_path, monkeypatch):
    _, data_dir, _ = stdlib_data
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # best at step 2, then worse

    def scripted(self, state, eval_step):
        return {"loss": next(losses), "perplexity": 1.0, "accuracy": 0.0, "tokens": 1.0}

    monkeypatch.setattr(TokenObjective, "evaluate", scripted)
    common = {"eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1}
    exp = tiny.experiment(data_dir, optim={"decay_steps": 6},
                          train={**common, "steps": 6, "early_stopping_patience": 2})
    wd = str(tmp_path / "run")
    msgs = []
    result = loop.train(exp, wd, log=msgs.append)
    assert result["step"] == 4 and result["best"] == {"step": 2, "loss": 2.0}
    assert any(m.startswith("early stopping at step 4") for m in msgs)
    ckpts = sorted(f for f in os.listdir(os.path.join(wd, "checkpoints")) if f.endswith(".index"))
    assert ckpts == ["ckpt-4.index"]  # keep-last-N removed ckpt-2 ...
    best_dir = os.path.join(wd, "best")
    assert json.load(open(os.path.join(best_dir, "best.json"))) == {"step": 2, "loss": 2.0}
    # ... but the best weights are those of step 2 (a 2-step run of the same config).
    ref = tiny.experiment(data_dir, optim={"decay_steps": 6}, train={**common, "steps": 2})
    monkeypatch.setattr(TokenObjective, "evaluate", lambda *a: {
        "loss": 1.0, "perplexity": 1.0, "accuracy": 0.0, "tokens": 1.0})
    loop.train(ref, str(tmp_path / "ref"), log=quiet)
    best_model, _ = load_workdir(wd, os.path.join(best_dir, "ckpt-2"))
    ref_model, _ = load_workdir(str(tmp_path / "ref"))
    last_model, _ = load_workdir(wd)
    for a, b, c in zip(best_model.weights, ref_model.weights, last_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert any(not np.array_equal(a.numpy(), c.numpy())
               for a, c in zip(best_model.weights, last_model.weights))
    assert int(tf.train.load_checkpoint(os.path.join(best_dir, "ckpt-2")).get_tensor(
        "step/.ATTRIBUTES/VARIABLE_VALUE")) == 2
