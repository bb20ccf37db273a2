"""GRPO: loss, advantages and clipping against numpy; runs through the one Runner (LoRA
with adapters-off reference, MoE with a frozen copy), resume, reward plug-in errors."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import GRPOConfig
from deepseek_tf.config.train import GRPO_REWARDS
from deepseek_tf.data.demo import make_splits
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.scoring import next_token_scores
from deepseek_tf.train.grpo import GRPOObjective, grpo_token_loss
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from deepseek_tf.train.rewards import BUILTIN, Rewards, advantages, extract_answer
from tests.helpers import tiny
from tests.helpers.workdirs import make_workdir, random_model

quiet = lambda *_: None  # noqa: E731


def varied(prompt, completion, reference):
    """A reward plug-in that differs between a random model's samples (so that groups
    have advantages to learn from)."""
    return sum(map(ord, completion)) % 7 / 7.0


def varied_arithmetic(prompt, completion, reference):
    """`varied` for arithmetic prompts, one fixed reward for every answer to the others
    (so their groups have zero variance)."""
    arithmetic = prompt.startswith(("Add", "Subtract"))
    return varied(prompt, completion, reference) if arithmetic else 0.5


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_grpo(logp, old, ref, rewards, group, eps, beta, mask):
    r = rewards.reshape(-1, group)
    std = r.std(axis=1, ddof=1, keepdims=True)
    adv = np.where(std > 0, (r - r.mean(1, keepdims=True)) / (std + 1e-4), 0.0).reshape(-1)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_token = -surrogate + beta * kl
    return adv, (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_and_advantages_equal_a_numpy_reference(temperature):
    rng = np.random.default_rng(0)
    n, t, v, group = 6, 7, 11, 3
    logits = rng.normal(size=(n, t, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(n, t)).astype(np.int32)
    mask = np.zeros((n, t), np.float32)
    for i in range(n):
        mask[i, 2:2 + 1 + i % 4] = 1.0  # completions of different lengths
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0], np.float32)  # 2nd group: all equal
    old = (_np_log_softmax(logits) + rng.normal(scale=0.3, size=(n, t, v)))
    ref = rng.normal(scale=0.5, size=(n, t)).astype(np.float32) - 2.0
    lp_all = _np_log_softmax(logits.astype(np.float64) / temperature)  # the sampled law
    logp = np.zeros((n, t))
    logp[:, 1:] = np.take_along_axis(lp_all[:, :-1], ids[:, 1:, None], -1)[..., 0]
    old_lp = np.zeros((n, t))
    old_lp[:, 1:] = np.take_along_axis(old[:, :-1], ids[:, 1:, None], -1)[..., 0]
    want_adv, want_loss = _np_grpo(logp * mask, old_lp * mask, ref * mask, rewards, group,
                                   0.2, 0.05, mask)
    adv = advantages(rewards, group)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6, atol=1e-7)
    assert np.all(adv[3:] == 0)
    tf_logp, _ = next_token_scores(tf.constant(logits), tf.constant(ids), tf.constant(mask),
                                   temperature)
    per_token, _, _ = grpo_token_loss(tf_logp, tf.constant(old_lp * mask, tf.float32),
                                      tf.constant(ref * mask), tf.constant(adv), 0.2, 0.05)
    loss = float(tf.reduce_sum(per_token * mask) / mask.sum())
    assert loss == pytest.approx(want_loss, rel=1e-5)


def test_clipping_engages_outside_the_trust_region():
    ratios = np.array([[0.5, 0.85, 1.0, 1.15, 1.5]] * 2, np.float32)
    adv = tf.constant([1.0, -1.0])
    old = tf.zeros_like(ratios)
    logp = tf.Variable(np.log(ratios))
    with tf.GradientTape() as tape:
        loss, kl, clipped = grpo_token_loss(logp, old, logp, adv, 0.2, 0.0)
        total = tf.reduce_sum(loss)
    grad = tape.gradient(total, logp).numpy()
    # A > 0: min(rA, clip(r)A) clips above 1 + eps; A < 0: below 1 - eps.
    np.testing.assert_array_equal(clipped.numpy(), [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
    np.testing.assert_allclose(grad, np.where(clipped.numpy() > 0, 0.0,
                                              -ratios * adv.numpy()[:, None]), rtol=1e-6)
    np.testing.assert_allclose(kl.numpy(), 0.0, atol=1e-7)  # policy == reference


def test_equal_rewards_leave_only_the_kl_gradient():
    model = random_model("gqa", seed=1)
    obj = GRPOObjective()
    obj.cfg = GRPOConfig(group_size=2, kl_coef=0.1)
    rng = np.random.default_rng(1)
    ids = tf.constant(rng.integers(0, 256, size=(4, 10)), tf.int32)
    mask = tf.constant(np.tile((np.arange(10) >= 4).astype(np.float32), (4, 1)))
    ref = tf.constant(rng.normal(scale=0.2, size=(4, 10)).astype(np.float32) - 5.0) * mask
    adv = tf.constant(advantages(np.array([1.0, 1.0, 0.0, 0.0]), 2))
    assert not np.any(adv.numpy())
    from deepseek_tf.scoring import score_tokens
    old = tf.stop_gradient(score_tokens(model, ids, mask)[0]) + 0.1 * mask  # ratio != 1

    def grads(batch, cfg):
        obj.cfg = cfg
        with tf.GradientTape() as tape:
            loss, _, _ = obj.forward(model, batch, True)
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]

    batch = {"ids": ids, "mask": mask, "old": old, "ref": ref, "adv": adv}
    with_kl = grads(batch, GRPOConfig(group_size=2, kl_coef=0.1))
    no_kl = grads(batch, GRPOConfig(group_size=2, kl_coef=0.0))
    assert not any(np.any(g.numpy()) for g in no_kl)
    # The KL term alone: d/dtheta of 0.1 * sum k3(ref - logp).
    with tf.GradientTape() as tape:
        lp = score_tokens(model, ids, mask)[0]
        d = ref - lp
        kl_only = 0.1 * tf.reduce_sum((tf.exp(d) - d - 1.0) * mask)
    want = tape.gradient(kl_only, model.trainable_variables)
    assert any(np.any(g.numpy()) for g in with_kl)
    for g, w in zip(with_kl, want):
        np.testing.assert_allclose(g.numpy(), tf.convert_to_tensor(w).numpy(), rtol=1e-5,
                                   atol=1e-8)


def test_the_step_scores_the_policy_at_the_sampling_temperature():
    """forward's log-probs are those of softmax(logits / T), the law the rollout sampled
    from (as old and ref are scored): with zero advantages its loss is the k3 KL alone,
    here against numpy on the model's logits."""
    model = random_model("gqa", seed=2)
    obj = GRPOObjective()
    obj.cfg = GRPOConfig(group_size=2, kl_coef=0.1, temperature=0.6)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 256, size=(2, 8)).astype(np.int32)
    mask = np.tile((np.arange(8) >= 3).astype(np.float32), (2, 1))
    ref = (rng.normal(scale=0.2, size=(2, 8)) - 4.0).astype(np.float32) * mask
    batch = {"ids": tf.constant(ids), "mask": tf.constant(mask), "old": tf.constant(ref),
             "ref": tf.constant(ref), "adv": tf.zeros([2])}
    loss, _, stats = obj.forward(model, batch, False)
    lp_all = _np_log_softmax(model(ids).numpy().astype(np.float64) / 0.6)
    logp = np.zeros((2, 8))
    logp[:, 1:] = np.take_along_axis(lp_all[:, :-1], ids[:, 1:, None], -1)[..., 0]
    d = ref - logp * mask
    kl = (np.exp(d) - d - 1) * mask
    assert float(stats["kl"]) == pytest.approx(kl.sum(), rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * kl.sum(), rel=1e-5)


def test_rewards_and_config_validation():
    cfg = GRPOConfig(group_size=2, reward="exact_match,format*0.5,length_penalty*0.1",
                     answer_marker="<answer>", max_new_tokens=10)
    comp = "<think>x</think><answer> 4 </answer>"
    total, parts = Rewards(cfg)(["Add"], [comp], ["4"], [5])
    assert parts == {"exact_match": [1.0], "format": [1.0], "length_penalty": [-0.5]}
    assert total.tolist() == pytest.approx([1.0 + 0.5 - 0.05])
    assert extract_answer("no marker", "<answer>") is None
    cfg = GRPOConfig(reward="numeric")  # 1 / (1 + |answer - reference|), by hand
    completions = ["41", " 40 ", "-3.5", "forty", "1e400", "41"]
    references = ["41", "41", "-1.5", "41", "41", "abc"]
    _, parts = Rewards(cfg)(["Q"] * 6, completions, references, [2] * 6)
    assert parts["numeric"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0, 0.0, 0.0])
    assert tuple(BUILTIN) == GRPO_REWARDS
    with pytest.raises(ConfigError, match="dynamic_sampling must be >= 0"):
        GRPOConfig(dynamic_sampling=-1)
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="neither exact_match"):
        GRPOConfig(reward="bleu")
    with pytest.raises(ConfigError, match="cannot import"):
        Rewards(GRPOConfig(reward="no_such_module_x:f"))


def test_more_than_one_replica_is_refused_in_one_line():
    from types import SimpleNamespace
    for replicas, pipelines in ((2, 1), (1, 2)):
        ctx = SimpleNamespace(num_replicas_in_sync=replicas, num_input_pipelines=pipelines)
        with pytest.raises(UserError, match="runs on one replica: use --train.strategy="
                           "default") as e:
            GRPOObjective().datasets(None, None, ctx)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------ through the Runner
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    rows, held = make_splits(num_train=24, num_heldout=0, seed=1)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, str(data)


def _exp(src, data, **sections):
    grpo = {"group_size": 2, "max_new_tokens": 6, "kl_coef": 0.05,
            "reward": "exact_match,length_penalty*0.1,tests.train.test_grpo:varied",
            **sections.pop("grpo", {})}
    base = tiny.fine_tuning(src, data, data={"seq_len": 64}, optim={"decay_steps": 4},
                            train={"steps": 3, "batch_size": 2, "checkpoint_every": 1,
                                   "stage": "grpo", **sections.pop("train", {})})
    return dataclasses.replace(base, grpo=GRPOConfig(**grpo))


def test_lora_grpo_run_logs_rewards_and_resumes_bitwise(demo):
    root, data = demo
    src, _ = make_workdir(str(root / "src"), "gqa", seed=5)
    exp = _exp(src, data, grpo={"inner_steps": 2, "temperature": 1.5, "dynamic_sampling": 2,
                                "reward": "exact_match,length_penalty*0.1,"
                                          "tests.train.test_grpo:varied_arithmetic"},
               train={"steps": 4, "finetuning_type": "lora"})
    logs = []
    full = train(exp, str(root / "full"), log=logs.append)
    assert any("adapters switched off" in str(m) for m in logs)
    rows = [r for r in read_log(str(root / "full")) if r["kind"] == "train"]
    assert len(rows) == 4
    for key in ("reward", "reward_std", "zero_variance_groups", "rewards/exact_match",
                "rewards/length_penalty", "rewards/tests.train.test_grpo:varied_arithmetic", "kl",
                "clip_fraction", "rollout_seconds", "sample_tokens_per_sec"):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at first
    assert rows[0]["clip_fraction"] == 0.0  # ratio 1 at the first inner step
    assert all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    assert rows[-1]["kl"] > 0 and rows[0]["grad_norm"] > 0  # the policy moved
    assert max(r["sampled_batches"] for r in rows) > 1  # dynamic sampling drew more
    assert set(full["eval"]) >= {"loss", "reward", "rewards/exact_match"}
    assert full["eval"]["loss"] == -full["eval"]["reward"]
    # Stop in the middle of a rollout's inner steps (step 3 of 4), then continue.
    half = train(dataclasses.replace(exp, train=exp.train.replace(steps=3)),
                 str(root / "resumed"), log=quiet)
    assert half["step"] == 3
    again = train(exp, str(root / "resumed"), log=quiet)
    assert again["weights_sha256"] == full["weights_sha256"]


def test_dynamic_sampling_keeps_groups_whose_rewards_differ(demo):
    """--grpo.dynamic_sampling=3, against the same draws made one by one: the batch is
    the groups with differing rewards of the successive draws (only arithmetic prompts'
    rewards vary; the rest are set aside), in draw order, then the set-aside ones; drawing stops once the batch is full or after
    4 draws. (Resume with dynamic sampling: the LoRA run test above.)"""
    from types import SimpleNamespace

    from deepseek_tf.train.loop import Runner
    root, data = demo
    src, _ = make_workdir(str(root / "src-ds"), "gqa", seed=5)
    exp = _exp(src, data, grpo={"dynamic_sampling": 3, "group_size": 4,
                                "reward": "tests.train.test_grpo:varied_arithmetic"},
               train={"steps": 2, "batch_size": 4, "finetuning_type": "lora"})
    with contextlib.ExitStack() as cleanup:
        runner = Runner.begin(exp, str(root / "ds-probe"), quiet, cleanup)
        obj, model = runner.objective, runner.state.model
        obj._tf_fns(model, False)
        groups, stats = obj.rollout(model, 0)
        # The reference: the same draws again from a fresh prompt order.
        obj.datasets(exp, None, SimpleNamespace(num_replicas_in_sync=1,
                                                num_input_pipelines=1))
        draws = [obj._draw(model, 0, a)[0] for a in range(4)]
        runner.end()
    differ = lambda grp: len(set(grp[2].tolist())) > 1  # noqa: E731
    need = next((k + 1 for k in range(4)
                 if sum(differ(g) for d in draws[:k + 1] for g in d) >= 4), 4)
    drawn = [g for d in draws[:need] for g in d]
    want = ([g for g in drawn if differ(g)] + [g for g in drawn if not differ(g)])[:4]
    assert stats["sampled_batches"] == need > 1  # groups were set aside and replaced
    assert stats["sampled_zero_variance_groups"] == sum(not differ(g) for g in drawn) / (
        4 * need)
    assert [[it[0] for it in g[0]] for g in groups] == [[it[0] for it in g[0]] for g in want]
    for got, ref in zip(groups, want):
        np.testing.assert_array_equal(got[2], ref[2])
    kept = sum(map(differ, groups))
    assert kept == min(4, sum(map(differ, drawn))) > sum(map(differ, draws[0]))


def test_moe_grpo_run_in_bfloat16_with_a_frozen_reference_copy(demo):
    """Full fine-tuning of an MoE model (MLA, routed + shared experts, an MTP module) in
    mixed_bfloat16: the reference is a frozen copy, equal to the policy at the start."""
    root, data = demo
    src, _ = make_workdir(str(root / "moe"), "mla_moe", seed=3, num_nextn_predict_layers=1)
    logs = []
    result = train(_exp(src, data, train={"steps": 2, "precision": "mixed_bfloat16"}),
                   str(root / "moe-run"), log=logs.append)
    assert any("reference model: the frozen weights" in str(m) for m in logs)
    rows = [r for r in read_log(str(root / "moe-run")) if r["kind"] == "train"]
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(result["eval"]["reward"])


def test_bad_reward_plugins_stop_the_preset_run_with_one_error(demo, tmp_path,
                                                              monkeypatch):
    """configs/grpo-tiny.flags as shipped (LoRA, jit_compile=auto), shortened: a plug-in
    that returns a non-number is refused by name; one that raises at its third rollout
    stops the CLI with one error line, exit 2, and the checkpoint of step 2 intact."""
    root, data = demo
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text("CALLS = [0]\n"
                      "def wordy(prompt, completion, reference):\n    return 'yes'\n"
                      "def flaky(prompt, completion, reference):\n"
                      "    CALLS[0] += 1\n"
                      "    if CALLS[0] > 8:\n        raise ValueError('scorer down')\n"
                      "    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="my_rewards:wordy returned 'yes', not a finite"):
        Rewards(GRPOConfig(reward="my_rewards:wordy"))(["p"], ["c"], ["r"], [1])
    src, _ = make_workdir(str(tmp_path / "src"), "gqa", seed=5)
    wd = str(tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_tf.train", "--flagfile=configs/grpo-tiny.flags",
         f"--workdir={wd}", f"--train.init_from={src}", f"--data.inputs={data}",
         "--data.val_size=4", "--data.seq_len=64", "--train.steps=4", "--train.batch_size=2",
         "--train.checkpoint_every=1", "--train.log_every=1", "--optim.warmup_steps=0",
         "--grpo.group_size=2", "--grpo.inner_steps=1", "--grpo.max_new_tokens=4",
         "--grpo.dynamic_sampling=0",
         "--grpo.reward=my_rewards:flaky"],
        capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "my_rewards:flaky raised ValueError: scorer down" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "jit_compile: auto -> " in proc.stdout + proc.stderr
    assert tf.train.latest_checkpoint(os.path.join(wd, "checkpoints")).endswith("ckpt-2")
