"""The training loop in-process: learning, artifacts, bitwise resume, accumulation."""

import dataclasses
import gc
import json
import os
from xml.etree import ElementTree

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny

quiet = lambda *_: None  # noqa: E731


def _weights(workdir):
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
    return {k: reader.get_tensor(k) for k in sorted(reader.get_variable_to_shape_map())
            if k.startswith("model/")}


def _train_losses(workdir):
    return [(r["step"], r["loss"]) for r in read_log(workdir) if r["kind"] == "train"]


def _live_iterators() -> int:
    return sum(isinstance(o, tf.data.Iterator) for o in gc.get_objects())


def test_short_run_learns_and_writes_every_artifact(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={"steps": 30, "log_every": 5, "eval_every": 15})
    wd = str(tmp_path / "run")
    iterators = _live_iterators()
    result = train(exp, wd, log=quiet)
    # The run's input iterators are freed when it returns, not left to a later garbage
    # collection (whose destroying an idle tf.data iterator could block for a minute).
    assert _live_iterators() == iterators
    losses = [l for _, l in _train_losses(wd)]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert result["eval"]["loss"] < 4.5 and np.isfinite(result["eval"]["perplexity"])
    # The default stage "auto" is saved resolved: plain text data is pretraining.
    saved = Experiment.load(os.path.join(wd, "config.json"))
    assert saved.train.stage == "pretrain" and saved == dataclasses.replace(
        exp, train=exp.train.replace(stage="pretrain"))
    assert tf.train.latest_checkpoint(os.path.join(wd, "checkpoints")).endswith("-30")
    events = [f for _, _, fs in os.walk(os.path.join(wd, "tensorboard")) for f in fs]
    assert any(f.startswith("events.out.tfevents") for f in events)
    svg = ElementTree.parse(os.path.join(wd, "loss.svg")).getroot()
    assert svg.find("{http://www.w3.org/2000/svg}polyline") is not None  # the train curve
    rows = read_log(wd)
    train_keys = {"loss", "lr", "grad_norm", "tokens_per_sec", "tokens_seen", "accuracy"}
    assert train_keys <= set(next(r for r in rows if r["kind"] == "train"))
    memory = [r for r in rows if r["kind"] == "memory"]  # the estimate, then the peak RSS
    assert memory[0]["total"] > memory[0]["parameters"] > 0 and memory[1]["peak_rss"] > 0
    assert {"loss", "perplexity", "accuracy"} <= set(next(r for r in rows if r["kind"] == "eval"))


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    n = 6
    common = {"optim": {"decay_steps": 2 * n},
              "train": {"log_every": 1, "checkpoint_every": 3, "eval_every": 0}}
    full = tiny.experiment(data_dir, optim=common["optim"],
                           train={**common["train"], "steps": 2 * n})
    half = tiny.experiment(data_dir, optim=common["optim"], train={**common["train"], "steps": n})
    a, b = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(full, a, log=quiet)
    train(half, b, log=quiet)
    assert _weights(a).keys() == _weights(b).keys()
    msgs = []
    train(full, b, log=msgs.append)  # same workdir, more steps: resumes at step n
    assert any(f"at step {n}" in m for m in msgs)
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert _train_losses(a) == _train_losses(b)
    assert [s for s, _ in _train_losses(b)] == list(range(1, 2 * n + 1))


def test_gradient_accumulation_equals_the_large_batch_step(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    common = {"data": {"shuffle_buffer": 0}, "optim": {"clip_norm": 0.5}}
    big = tiny.experiment(data_dir, **common,
                          train={"steps": 3, "batch_size": 4, "grad_accum_steps": 1})
    acc = tiny.experiment(data_dir, **common,
                          train={"steps": 3, "batch_size": 2, "grad_accum_steps": 2})
    train(big, str(tmp_path / "big"), log=quiet)
    train(acc, str(tmp_path / "acc"), log=quiet)
    wa, wb = _weights(str(tmp_path / "big")), _weights(str(tmp_path / "acc"))
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=2e-6, rtol=1e-5, err_msg=k)
    la = [l for _, l in _train_losses(str(tmp_path / "big"))]
    lb = [l for _, l in _train_losses(str(tmp_path / "acc"))]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_no_weight_decay_on_norms_and_embeddings(stdlib_data, tmp_path):
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.train.optimizer import make_optimizer

    model = DeepSeekCausalLM(tiny.model_config())
    opt = make_optimizer(tiny.experiment("x").optim, 10, model)
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert decayed and all("kernel" in p for p in decayed)
    assert not any("embed" in p or "norm" in p for p in decayed)


def test_config_of_a_run_is_the_one_saved(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={"steps": 2, "eval_every": 0})
    train(exp, str(tmp_path), log=quiet)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["hidden_size"] == exp.model.hidden_size
    assert saved["data"]["data_dir"] == data_dir


def test_sft_run_trains_on_masked_targets_and_copies_the_tokenizer(tmp_path):
    from deepseek_tf.data.prepare import prepare
    from tests.helpers.corpora import write_jsonl

    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in
            ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta") * 3]
    rows = [dict(r, input=str(i)) for i, r in enumerate(rows)]
    data_dir = str(tmp_path / "data")
    prepare(tiny.data_config(inputs=write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca",
                             template="plain", max_samples=0, seq_len=64), data_dir, log=quiet)
    exp = tiny.experiment(data_dir, data={"format": "alpaca", "seq_len": 64},
                          train={"steps": 4, "eval_every": 0, "eval_steps": 1})
    wd = str(tmp_path / "run")
    result = train(exp, wd, log=quiet)
    assert np.isfinite(result["train"]["loss"]) and result["eval"]["tokens"] > 0
    # Only answer tokens count: far fewer loss tokens than window tokens.
    assert result["eval"]["tokens"] < 0.5 * exp.train.batch_size * exp.data.seq_len
    assert sorted(os.listdir(os.path.join(wd, "tokenizer"))) == ["tokenizer_config.json"]
    assert Experiment.load(os.path.join(wd, "config.json")).train.stage == "sft"  # chat data


def test_a_workdir_saved_with_the_old_sft_default_resumes(stdlib_data, tmp_path):
    """Before the pretrain stage existed, pretraining saved stage "sft": such a workdir
    loads and continues (the same token loss) under its saved label."""
    from absl import flags

    from deepseek_tf import flags as dflags

    _, data_dir, _ = stdlib_data
    wd = str(tmp_path / "run")
    old = tiny.experiment(data_dir, train={"steps": 2, "eval_every": 0, "stage": "sft"})
    train(old, wd, log=quiet)
    fv = flags.FlagValues()
    dflags.define_flags(flag_values=fv)
    fv(["train", f"--workdir={wd}", "--train.steps=4"])
    exp = dflags.resolve_experiment(fv, wd)
    assert exp.train.stage == "sft"
    assert train(exp, wd, log=quiet)["step"] == 4


def test_corrupt_shard_stops_training_with_file_and_offset(stdlib_data, tmp_path):
    from deepseek_tf.errors import UserError

    _, data_dir, meta = stdlib_data
    copy = tmp_path / "data"
    copy.mkdir()
    for f in os.listdir(data_dir):
        data = bytearray(open(os.path.join(data_dir, f), "rb").read())
        if f.startswith("train-"):
            data[20] ^= 0xFF  # in the first record's data (which starts at byte 12)
        (copy / f).write_bytes(bytes(data))
    exp = tiny.experiment(str(copy), train={"steps": 2, "eval_every": 0})
    with pytest.raises(UserError) as e:
        train(exp, str(tmp_path / "run"), log=quiet)
    msg = str(e.value)
    assert "/train-0000" in msg and "corrupted at byte offset 12" in msg, msg


def test_tokenizer_larger_than_the_model_is_a_clear_error(tmp_path):
    from deepseek_tf.config import DataConfig, TokenizerConfig
    from deepseek_tf.data.prepare import prepare
    from deepseek_tf.errors import ConfigError
    from tests.helpers.corpora import DOCS, write_jsonl

    data_dir = str(tmp_path / "data")
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d * 20} for d in DOCS] * 3)
    prepare(DataConfig(inputs=path, val_size=1, dedup_exact=False), data_dir,
            TokenizerConfig(type="sentencepiece", vocab_size=400), log=quiet)
    exp = tiny.experiment(data_dir)  # model vocab 264 < 400
    with pytest.raises(ConfigError, match="sentencepiece tokenizer has 400 ids.*>= 400"):
        train(exp, str(tmp_path / "run"), log=quiet)
    assert not os.path.exists(tmp_path / "run")
