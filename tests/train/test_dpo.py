"""DPO: the loss equals a hand computation; a short run grows the chosen margin."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import DPOConfig, Experiment
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.errors import ConfigError
from deepseek_tf.train.dpo import dpo_loss, encode_pairs, pair_conversations
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import rewind
from tests.helpers.corpora import write_jsonl
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731


def test_sigmoid_and_ipo_losses_equal_a_hand_computation():
    pc, pr = tf.constant([-3.0, -5.0]), tf.constant([-4.0, -2.0])
    rc, rr = tf.constant([-3.5, -4.0]), tf.constant([-3.5, -3.0])
    beta = 0.5
    loss, wc, wr = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=beta))
    z = [beta * ((-3.0 + 3.5) - (-4.0 + 3.5)), beta * ((-5.0 + 4.0) - (-2.0 + 3.0))]  # 0.5, -1
    want = [math.log1p(math.exp(-x)) for x in z]  # -log sigmoid(z)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(wc.numpy(), [0.25, -0.5], rtol=1e-6)
    np.testing.assert_allclose(wr.numpy(), [-0.25, 0.5], rtol=1e-6)
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=beta, label_smoothing=0.1))
    np.testing.assert_allclose(smooth.numpy(), [0.9 * math.log1p(math.exp(-x)) + 0.1 *
                                                math.log1p(math.exp(x)) for x in z], rtol=1e-6)
    n_c, n_r = tf.constant([2.0, 4.0]), tf.constant([1.0, 2.0])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=beta, loss="ipo"), n_c, n_r)
    h = [0.5 / 2 - (-0.5) / 1, -1.0 / 4 - 1.0 / 2]
    np.testing.assert_allclose(ipo.numpy(), [(x - 1.0) ** 2 for x in h], rtol=1e-6)


def test_pairs_go_through_the_sft_template_and_mask():
    tok = ByteTokenizer()
    rec = {"instruction": "Say it", "chosen": "yes", "rejected": "no"}
    chosen, rejected = pair_conversations(rec)
    assert chosen.messages[-1] == ("assistant", "yes")
    out = encode_pairs([rec, {"prompt": "Hi", "chosen": "a", "rejected": "bb"}],
                       TEMPLATES["plain"], tok, 48)
    ids, mask = out["ids"][0], out["mask"][0]
    assert bytes(int(i) for i, m in zip(ids[0], mask[0]) if m and i < 256) == b"yes"
    assert bytes(int(i) for i, m in zip(ids[1], mask[1]) if m and i < 256) == b"no"
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"}}
    assert pair_conversations(sharegpt)[1].messages[-1] == ("assistant", "bad")


def test_dpo_run_grows_the_chosen_margin_and_logs_reward_accuracy(tmp_path):
    src, _ = make_workdir(str(tmp_path / "src"), "gqa", seed=5)
    rows = [{"instruction": f"Answer {i}", "chosen": "yes", "rejected": "no"}
            for i in range(24)]
    base = tiny.fine_tuning(src, write_jsonl(tmp_path / "pairs.jsonl", rows),
                            train={"steps": 8, "eval_every": 4, "checkpoint_every": 4,
                                   "stage": "dpo", "finetuning_type": "lora"})
    exp = dataclasses.replace(base, dpo=DPOConfig(beta=0.5))
    wd = str(tmp_path / "dpo")
    result = train(exp, wd, log=quiet)
    rows = [r for r in read_log(wd) if r["kind"] == "train"]
    assert len(rows) == 8 and "rewards/accuracy" in rows[0]
    margins = [r["rewards/margin"] for r in rows]
    assert abs(margins[0]) < 1e-3  # policy == reference at the first step
    assert margins[-1] > margins[0] + 0.5, margins
    assert result["eval"]["rewards/accuracy"] == 1.0
    assert os.path.exists(os.path.join(wd, "adapter", "adapter.safetensors"))
    # The reference's log-probs computed once up front: the same run, to float rounding.
    pre = dataclasses.replace(exp, dpo=DPOConfig(beta=0.5, reference="precomputed"))
    train(pre, str(tmp_path / "pre"), log=quiet)
    pre_rows = [r for r in read_log(str(tmp_path / "pre")) if r["kind"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in pre_rows], [r["loss"] for r in rows],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="init_from"):
        train(dataclasses.replace(exp, train=exp.train.replace(init_from="")),
              str(tmp_path / "x"), log=quiet)


# DPO on a MoE model (DeepSeek-V3 shape at toy size: MLA, a dense first block, then
# 8 routed experts top-2 with the noaux_tc bias, a shared expert, one MTP module),
# through the one Runner.
@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-moe")
    src, _ = make_workdir(str(root / "src"), "mla_moe", seed=3, num_nextn_predict_layers=1,
                          bias_update_speed=0.01)
    rows = [{"instruction": f"Q{i}", "chosen": "yes" * (1 + i % 3), "rejected": "no"}
            for i in range(12)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, str(data)


def _moe_exp(moe_source, **train):
    src, data = moe_source
    return tiny.fine_tuning(src, data, optim={"decay_steps": 4},
                            train={"steps": 2, "batch_size": 2, "checkpoint_every": 2,
                                   "stage": "dpo", **train})


def _weights(workdir):
    from deepseek_tf.workdir import load_workdir

    model, _ = load_workdir(workdir)
    return [(v.path.split("/", 1)[1], v.numpy()) for v in model.weights]


def _first_rewards_are_exactly_zero(workdir):
    """Policy and reference score in one mode (no dropout, dropless MoE): at the first
    step (policy == reference) every reward is exactly 0 and the loss is log 2."""
    first = next(r for r in read_log(workdir) if r["kind"] == "train")
    assert first["rewards/margin"] == 0.0 and first["rewards/chosen"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2.0), rel=1e-6)  # -log sigmoid(0)


def test_moe_dpo_accumulation_equals_the_large_batch(moe_source, tmp_path):
    big = _moe_exp(moe_source, batch_size=4)
    acc = _moe_exp(moe_source, batch_size=2, grad_accum_steps=2)
    a, b = str(tmp_path / "big"), str(tmp_path / "acc")
    train(big, a, log=quiet)
    result = train(acc, b, log=quiet)
    _first_rewards_are_exactly_zero(a)
    _first_rewards_are_exactly_zero(b)
    assert set(result["eval"]) >= {"loss", "rewards/accuracy", "rewards/margin"}
    la = [r["loss"] for r in read_log(a) if r["kind"] == "train"]
    lb = [r["loss"] for r in read_log(b) if r["kind"] == "train"]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for (name, wa), (_, wb) in zip(_weights(a), _weights(b)):
        np.testing.assert_allclose(wb, wa, rtol=1e-4, atol=1e-6, err_msg=name)


def test_moe_dpo_under_xla_in_bfloat16_resumes_bitwise_and_keeps_mtp_frozen(moe_source,
                                                                             tmp_path):
    """XLA (static dropless buffers) and mixed_bfloat16, as given; zero margin at the
    first step; stop at step 2 and continue == a straight run."""
    settings = {"jit_compile": "true", "precision": "mixed_bfloat16"}
    full = _moe_exp(moe_source, steps=4, **settings)
    a = str(tmp_path / "full")
    want = train(full, a, log=quiet)["weights_sha256"]
    _first_rewards_are_exactly_zero(a)
    saved = Experiment.load(os.path.join(a, "config.json")).train
    assert (saved.jit_compile, saved.precision) == ("true", "mixed_bfloat16")
    b = rewind(a, str(tmp_path / "resumed"), 2)  # as if it had stopped at step 2
    msgs = []
    assert train(full, b, log=msgs.append)["weights_sha256"] == want
    assert any("at step 2" in m for m in msgs), msgs
    src, trained = _weights(moe_source[0]), _weights(a)
    same = {name: np.array_equal(x, y) for (name, x), (_, y) in zip(src, trained)}
    mtp = [name for name in same if name.startswith("mtp_1")]
    assert mtp and all(same[name] for name in mtp)  # unused by DPO's loss: frozen
    assert not all(same.values())


def test_moe_dpo_nan_step_is_rolled_back_by_the_runner(moe_source, tmp_path, monkeypatch):
    from tests.train.test_recovery import _nan_once_at

    _nan_once_at(monkeypatch, 3)
    exp = _moe_exp(moe_source, steps=4, keep_checkpoints=5)
    wd = str(tmp_path / "run")
    result = train(exp, wd, log=quiet)
    assert result["step"] == 4 and np.isfinite(result["eval"]["loss"])
    events = [r for r in read_log(wd) if r["kind"] == "recovery"]
    assert [(e["step"], e["bad_step"]) for e in events] == [(2, 3)]
    assert all(np.isfinite(r["loss"]) for r in read_log(wd) if r["kind"] == "train")


def test_orpo_and_simpo_losses_equal_a_hand_computation():
    """Reference-free losses on length-averaged log-probs (the reference is ignored)."""
    pc, pr = tf.constant([-3.0, -5.0]), tf.constant([-4.0, -2.0])
    ignored = tf.constant([123.0, -7.0])
    n_c, n_r = tf.constant([2.0, 4.0]), tf.constant([1.0, 2.0])
    a_c, a_r = [-1.5, -1.25], [-4.0, -1.0]
    simpo, wc, wr = dpo_loss(pc, pr, ignored, ignored,
                             DPOConfig(beta=2.0, loss="simpo", gamma=0.5), n_c, n_r)
    z = [2.0 * (c - r) - 0.5 for c, r in zip(a_c, a_r)]
    np.testing.assert_allclose(simpo.numpy(), [math.log1p(math.exp(-x)) for x in z], rtol=1e-6)
    np.testing.assert_allclose(wc.numpy(), [2.0 * x for x in a_c], rtol=1e-6)
    np.testing.assert_allclose(wr.numpy(), [2.0 * x for x in a_r], rtol=1e-6)
    orpo, _, _ = dpo_loss(pc, pr, ignored, ignored, DPOConfig(beta=0.1, loss="orpo"), n_c, n_r)

    def odds(a):  # log (p / (1 - p)) of p = exp(a)
        p = math.exp(a)
        return math.log(p / (1.0 - p))

    want = [-c + 0.1 * math.log1p(math.exp(-(odds(c) - odds(r)))) for c, r in zip(a_c, a_r)]
    np.testing.assert_allclose(orpo.numpy(), want, rtol=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing applies to --dpo.loss=sigmoid"):
        DPOConfig(loss="simpo", label_smoothing=0.1)


def test_reference_free_losses_train_without_a_reference(tmp_path):
    src, _ = make_workdir(str(tmp_path / "src"), "gqa", seed=5)
    rows = [{"instruction": f"Answer {i}", "chosen": "yes", "rejected": "no"}
            for i in range(12)]
    exp = tiny.fine_tuning(src, write_jsonl(tmp_path / "pairs.jsonl", rows),
                           train={"steps": 4, "checkpoint_every": 4, "stage": "dpo",
                                  "finetuning_type": "lora"})
    for loss in ("orpo", "simpo"):
        wd, logs = str(tmp_path / loss), []
        cfg = DPOConfig(beta=2.0, loss=loss, reference="precomputed")
        result = train(dataclasses.replace(exp, dpo=cfg), wd, log=logs.append)
        assert any(f"reference model: none (--dpo.loss={loss})" in str(m) for m in logs)
        assert not any("precomputed" in str(m) for m in logs)
        rows = [r for r in read_log(wd) if r["kind"] == "train"]
        assert rows[-1]["rewards/margin"] > rows[0]["rewards/margin"], (loss, rows)
        assert result["eval"]["rewards/accuracy"] == 1.0
