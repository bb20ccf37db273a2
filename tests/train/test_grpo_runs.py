"""GRPO runs through the Runner: held-out reward rises with a bounded KL; kill -9 and
resume reproduce the straight run bitwise (sampling included); a NaN rollback restores
the rollout buffer with the weights."""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepseek_tf.config import GRPOConfig
from deepseek_tf.data.demo import make_splits
from deepseek_tf.train.grpo import BATCH, GRPOObjective
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import Runner, train, weights_fingerprint
from tests.helpers import tiny
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOWELS = set("aeiou")
STALL = "GRPO_TEST_STALL"  # "<marker file>:<reward call>": stall_then_vowels hangs there
CALLS = [0]


def vowels(prompt, completion, reference):
    """Reward plug-in: the share of vowels in the completion (learnable by a random model
    whatever the prompt, so a rise generalises to held-out prompts)."""
    return sum(c in VOWELS for c in completion) / max(len(completion), 1)


def stall_then_vowels(prompt, completion, reference):
    """`vowels`, but with $GRPO_TEST_STALL=MARKER:N the N-th call writes MARKER and hangs
    (mid-rollout, for the kill -9 test)."""
    CALLS[0] += 1
    marker, _, n = os.environ.get(STALL, "").rpartition(":")
    if marker and CALLS[0] == int(n):
        open(marker, "w").close()
        time.sleep(600)
    return vowels(prompt, completion, reference)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(random gqa workdir, demo prompts: 48 train + 16 held out)."""
    root = tmp_path_factory.mktemp("grpo_runs")
    src, _ = make_workdir(str(root / "src"), "gqa", seed=7)
    rows, _ = make_splits(num_train=64, num_heldout=0, seed=3)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, str(data)


def _exp(source, reward="tests.train.test_grpo_runs:vowels", grpo=None, **train):
    src, data = source
    grpo = {"group_size": 4, "max_new_tokens": 6, "kl_coef": 0.05, "temperature": 1.0,
            "reward": reward, **(grpo or {})}
    base = tiny.fine_tuning(src, data, data={"seq_len": 64, "val_size": 16},
                            optim={"learning_rate": 1e-2, "decay_steps": 100},
                            train={"steps": 6, "batch_size": 4, "checkpoint_every": 2,
                                   "stage": "grpo", "finetuning_type": "lora", **train})
    return dataclasses.replace(base, grpo=GRPOConfig(**grpo))


def test_reward_rises_on_heldout_prompts_with_a_bounded_kl(source, tmp_path):
    """Greedy completions of the 16 held-out prompts, before and after 12 steps: more
    prompts gain reward than lose it (a one-sided sign test at 1%), the mean rises, and
    the policy drifts from the reference by a positive, finite, small KL."""
    exp = _exp(source, grpo={"kl_coef": 0.2}, steps=12, checkpoint_every=12)
    exp = dataclasses.replace(exp, optim=exp.optim.replace(learning_rate=5e-3))
    wd = str(tmp_path / "run")
    with contextlib.ExitStack() as cleanup:
        runner = Runner.begin(exp, wd, quiet, cleanup)
        before, _ = runner.objective.heldout_rewards(runner.state)
        while not runner.done:
            runner.run_step()
        after, _ = runner.objective.heldout_rewards(runner.state)
        runner.end()
    gained, lost = int(np.sum(after > before)), int(np.sum(after < before))
    n = gained + lost
    p_value = sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n
    assert p_value < 0.01, (before, after)
    assert after.mean() > before.mean()
    kl = [r["kl"] for r in read_log(wd) if r["kind"] == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and all(np.isfinite(kl))
    # Drifted, but held near the reference: well under a nat per token.
    assert kl[-1] > 0 and max(kl) < 1.0, kl


def test_kill_9_mid_rollout_then_resume_equals_the_straight_run(source, tmp_path):
    """A trainer process killed (SIGKILL) inside its 2nd rollout, after ckpt-2, then
    resumed: weights and every logged reward / KL / loss equal a straight run's."""
    exp = _exp(source, reward="tests.train.test_grpo_runs:stall_then_vowels",
               grpo={"inner_steps": 2}, steps=4)
    straight = train(exp, str(tmp_path / "straight"), log=quiet)
    wd, marker = tmp_path / "killed", tmp_path / "stalled"
    wd.mkdir()
    exp.save(str(wd / "exp.json"))
    code = ("import sys; from deepseek_tf.config import Experiment; "
            "from deepseek_tf.train.loop import train; "
            "train(Experiment.load(sys.argv[1]), sys.argv[2])")
    # Rollouts of 4 prompts x 4 samples: call 17 is in the 2nd one (before step 3).
    env = {**os.environ, STALL: f"{marker}:{16 + 1}", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", code, str(wd / "exp.json"), str(wd)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err.decode()[-2000:]
    ckpts = sorted(f for f in os.listdir(wd / "checkpoints") if f.endswith(".index"))
    assert ckpts[-1] == "ckpt-2.index", ckpts
    logs = []
    resumed = train(exp, str(wd), log=logs.append)
    assert any("resumed from" in str(m) and "ckpt-2" in str(m) for m in logs)
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    keys = ("loss", "kl", "clip_fraction", "reward", "reward_std", "zero_variance_groups",
            "sample_tokens", "grad_norm")

    def rows(path):
        return [{k: r[k] for k in keys} for r in read_log(path) if r["kind"] == "train"]
    assert rows(str(wd)) == rows(str(tmp_path / "straight"))


def test_nan_rollback_restores_the_rollout_buffer(source, tmp_path, monkeypatch):
    """NaN gradients at step 5 roll back to ckpt-3, in the middle of a rollout's two inner
    steps: step 4 is replayed on the batch it had (the buffer comes back with the
    weights, bitwise), then the next rollout samples fresh prompts."""
    from tests.train.test_recovery import _nan_once_at

    _nan_once_at(monkeypatch, 5)
    seen = []  # (step, batch digest, rollout stats, weights digest) at each before_step
    original = GRPOObjective.before_step

    def spy(self, state, step):
        original(self, state, step)
        h = hashlib.sha256()
        for k in BATCH:
            h.update(getattr(self.buffer, k).numpy().tobytes())
        seen.append((step, h.hexdigest(), self.rollout_stats(),
                     weights_fingerprint(state.model)))
    monkeypatch.setattr(GRPOObjective, "before_step", spy)
    wd = str(tmp_path / "run")
    result = train(_exp(source, grpo={"inner_steps": 2}, steps=6, checkpoint_every=3),
                   wd, log=quiet)
    assert result["step"] == 6 and np.isfinite(result["eval"]["loss"])
    events = [r for r in read_log(wd) if r["kind"] == "recovery"]
    assert [(e["step"], e["bad_step"]) for e in events] == [(3, 5)]
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4, 3, 4, 5]
    first, again = seen[:5], seen[5:]
    assert first[2][1] == first[3][1] != first[4][1]  # a rollout every 2 steps
    # Before the replayed step 4: batch, its log figures and weights as the first time,
    # not the batch sampled after the checkpoint.
    assert again[0][1:] == first[3][1:]
    assert again[1][3] == first[4][3]  # step 4 replayed bitwise
    assert again[1][1] not in (first[4][1], first[2][1])  # a fresh rollout, new prompts
    rows = [r for r in read_log(wd) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and "reward" in r for r in rows)
