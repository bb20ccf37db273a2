"""ZeRO-1 / ZeRO-2 (`--train.shard_optimizer`, train/sharding.py) on 2 local CPU workers
through the launcher, against plain MultiWorkerMirroredStrategy.

One launcher run per configuration, shared by the tests (module fixture `runs`): plain
MWMS, zero1 and zero2 over 20 steps (STEPS) of the tiny model with 2 accumulation steps and
clipping that engages, each with NaN gradients at step 8 that roll every worker back to
its step-6 checkpoint (weights, and with sharding each worker's moments); zero2 resumed
at step 6 of its own run; a mixed_float16 pair whose first steps overflow (skipped and the
loss scale halved on both sides alike); a mixed_bfloat16 pair (6 steps). The memory block
of the plain and zero2 runs is checked against what the workers held.

Only the CPU reduce-scatter (all-to-all + local sum) runs here: the GPU branch (NCCL's
`CollectiveReduceScatterV2`) needs GPUs, which this machine lacks; the code up to it
(shard layout, ordering, checkpoints) is what these tests cover.
"""

import os
import re

import numpy as np
import pytest

from deepseek_tf.errors import UserError
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from deepseek_tf.train.sharding import check_ranks
from tests.helpers import tiny
from tests.helpers.checkpoints import (assert_resume_refused, assert_runs_equal,
                                      checkpoint_tensors, rewind, run_weights,
                                      train_losses)
from tests.helpers.launcher import Launcher, train_flags, weights_sha

STEPS = 20  # the issue asks for 20 steps equal to plain MWMS
NAN_AT = 8  # the float32 runs roll back from a NaN at step 8 to ckpt-6 and go on
TIMEOUT = 420  # seconds for one 2-worker run on a busy 2-core machine
quiet = lambda *_: None  # noqa: E731


def _experiment(data_dir, **train):
    return tiny.experiment(data_dir, data={"shuffle_buffer": 0}, optim={"clip_norm": 0.5},
                           train={"steps": STEPS, "batch_size": 2, "grad_accum_steps": 2,
                                  "log_every": 1, "eval_every": STEPS,
                                  "checkpoint_every": 6, "keep_checkpoints": 5, **train})


def _launch(exp, workdir, nan_at=0):
    """Runs `exp` on 2 workers; `nan_at`: their gradients are NaN at that optimizer step
    (once), which rolls every worker back to the last checkpoint (tests/helpers/nan_train)."""
    module = ["--module=tests.helpers.nan_train"] if nan_at else []
    launcher = Launcher("--num_workers=2", f"--timeout={TIMEOUT}", *module, "--",
                        *train_flags(exp, workdir), env={"NAN_AT_STEP": str(nan_at)})
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    sha = weights_sha(output, 0)
    assert weights_sha(output, 1) == sha, output[-4000:]  # the workers agree
    return output, sha


@pytest.fixture(scope="module")
def runs(one_shard_data, tmp_path_factory):
    """{name: (workdir, output, weights sha)} of the 2-worker runs, made on first use."""
    root, done = tmp_path_factory.mktemp("sharding"), {}

    def get(name):
        if name not in done:
            mode, _, precision = name.partition("-")
            extra = {"precision": precision, "initial_loss_scale": 1e6, "steps": 6} \
                if precision else {}
            workdir = str(root / name)
            exp = _experiment(one_shard_data, shard_optimizer=mode, **extra)
            done[name] = (workdir, *_launch(exp, workdir, nan_at=0 if precision else NAN_AT))
        return done[name]

    return get


@pytest.mark.parametrize("mode", ["zero1", "zero2"])
def test_sharded_run_equals_plain_multiworker(runs, mode):
    """20 steps with accumulation, clipping and a NaN rollback: losses and final weights of
    zero1 / zero2 equal plain MWMS's within 1e-6."""
    plain, _, _ = runs("none")
    workdir, output, _ = runs(mode)
    for d in (plain, workdir):
        assert [r["step"] for r in read_log(d) if r["kind"] == "recovery"] == [6]
    for w in (0, 1):
        assert re.search(rf"^\[worker {w}\] optimizer sharding: {mode} over 2 workers: this "
                         rf"worker keeps AdamW moments of [\d,]+ of [\d,]+ weights", output,
                         re.M), output[-4000:]
    assert [r["grad_norm"] > 0.5 for r in read_log(plain) if r["kind"] == "train"].count(
        True) >= 6  # clipping engaged
    assert_runs_equal(workdir, plain, STEPS, atol=1e-6)


def _slot_bytes(tensors):
    return sum(t.nbytes for t in tensors)


def test_each_worker_holds_half_of_the_optimizer_state(runs):
    """Measured in the checkpoints: plain MWMS's moments (every worker holds all of them)
    vs each zero2 worker's shard; the sharded run's main checkpoint holds no moments."""
    plain, _, _ = runs("none")
    workdir, _, _ = runs("zero2")
    numel = sum(v.size for v in run_weights(plain).values())
    full = [t for k, t in checkpoint_tensors(plain).items()
            if k.startswith("optimizer/_variables/") and t.dtype == np.float32]
    assert _slot_bytes(full) == 2 * 4 * numel  # m and v of every weight
    main = checkpoint_tensors(workdir, ("optimizer/",))
    assert all(t.size == 1 for t in main.values()), {k: t.shape for k, t in main.items()}
    shard = -(-numel // 2)
    for w in (0, 1):
        path = os.path.join(workdir, "checkpoints", f"data-worker-{w}", f"ckpt-{STEPS}")
        mine = checkpoint_tensors(path, ("optimizer_shard/",))
        assert sorted(t.shape for t in mine.values()) == [(shard,), (shard,)]
        assert _slot_bytes(mine.values()) == 2 * 4 * shard  # 1/2 of `full`, + padding
        assert _slot_bytes(mine.values()) <= _slot_bytes(full) / 2 + 8


def test_zero2_resumes_bitwise(runs, one_shard_data, tmp_path):
    """The zero2 run rewound to its step-6 checkpoint and resumed by the same command (its
    NaN at step 8 and rollback included) ends bitwise equal: weights and every worker's
    moments."""
    straight, _, sha = runs("zero2")
    workdir = rewind(straight, str(tmp_path / "resumed"), 6)
    exp = _experiment(one_shard_data, shard_optimizer="zero2")
    output, resumed_sha = _launch(exp, workdir, nan_at=NAN_AT)
    for w in (0, 1):
        assert re.search(rf"^\[worker {w}\] resumed from .*ckpt-6 at step 6$", output, re.M)
    assert resumed_sha == sha
    for w in (0, 1):
        path = f"checkpoints/data-worker-{w}/ckpt-{STEPS}"
        a = checkpoint_tensors(os.path.join(straight, path), ("optimizer_shard/",))
        b = checkpoint_tensors(os.path.join(workdir, path), ("optimizer_shard/",))
        assert a.keys() == b.keys() and len(a) == 2
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert train_losses(workdir) == train_losses(straight)


def test_mixed_float16_overflow_skips_alike(runs):
    """mixed_float16 with a loss scale that overflows at first: zero2 skips the same steps
    and halves the scale as plain MWMS, then trains to the same weights (fp16 tolerance)."""
    plain, _, _ = runs("none-mixed_float16")
    workdir, _, _ = runs("zero2-mixed_float16")
    rows = [[(r["skipped_steps"], r["loss_scale"]) for r in read_log(d) if r["kind"] == "train"]
            for d in (plain, workdir)]
    assert rows[0] == rows[1]
    assert 0 < rows[0][-1][0] < 6, rows  # some steps skipped, some trained
    np.testing.assert_allclose(train_losses(workdir), train_losses(plain), rtol=0, atol=1e-4)
    a, b = run_weights(plain), run_weights(workdir)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)


def test_resume_on_another_worker_count_is_refused(runs, tmp_path):
    """The zero2 run resumed by one process: refused in one line that says what to do,
    and its checkpoints are left alone."""
    straight, _, _ = runs("zero2")
    assert_resume_refused(straight, str(tmp_path / "one"),
                          r"holds AdamW state sharded over 2 workers .* and this run's is not "
                          r"sharded: resume with the same number of workers")


def test_one_worker_is_a_no_op_and_mirrored_replicas_are_refused(one_shard_data, tmp_path):
    """One device: sharding is a no-op that says so; MirroredStrategy's replicas of one
    process cannot hold different shards: refused in one line."""
    lines = []
    exp = _experiment(one_shard_data, shard_optimizer="zero1", steps=1, grad_accum_steps=1)
    train(exp, str(tmp_path / "one"), log=lines.append)
    assert "--train.shard_optimizer=zero1: one worker, nothing to shard; every optimizer " \
           "state stays here" in lines
    mirrored = _experiment(one_shard_data, shard_optimizer="zero2", strategy="mirrored")
    with pytest.raises(UserError, match=r"shards over MultiWorkerMirroredStrategy workers, not "
                       r"the replicas of one process"):
        train(mirrored, str(tmp_path / "mirrored"), log=quiet)


def test_collective_ranks_must_follow_the_worker_indices():
    """Worker i updates shard i and receives row i of the all-to-all: a cluster whose
    collective ranks (the all-gather order) differ from the indices is refused."""
    check_ranks([0, 1, 2], "zero2")
    with pytest.raises(UserError, match=r"an all-gather of the indices gave \[1, 0\]"):
        check_ranks([1, 0], "zero1")


def test_memory_estimate_is_what_each_worker_holds(runs):
    """The memory block at the start (train/memory.py, analytic from the config) against
    the variables the workers held: parameters (the model's variables), optimizer state
    (plain: every moment; zero2: worker 0's shard) and summed gradients (as many float32
    values as the weights, or as a moment shard under zero2); both workers print their
    peak RSS after step 1."""
    for mode in ("none", "zero2"):
        workdir, output, _ = runs(mode)
        est = next(r for r in read_log(workdir) if r["kind"] == "memory")
        weights = run_weights(workdir)  # the run's model, rebuilt and restored
        numel = sum(v.size for v in weights.values())
        assert est["parameters"] == _slot_bytes(weights.values()) == 4 * numel
        if mode == "none":
            moments = [t for k, t in checkpoint_tensors(workdir).items()
                       if k.startswith("optimizer/_variables/") and t.dtype == np.float32]
            assert est["gradients"] == 4 * numel
        else:
            path = os.path.join(workdir, "checkpoints", "data-worker-0", f"ckpt-{STEPS}")
            moments = list(checkpoint_tensors(path, ("optimizer_shard/",)).values())
            assert est["gradients"] == 4 * moments[0].size < 4 * numel
        assert est["optimizer"] == _slot_bytes(moments)
        assert est["total"] == sum(est[k] for k in ("parameters", "gradients", "optimizer",
                                                     "activations"))
        assert re.search(r"^\[worker 0\] memory per worker \(estimate, alike on each of 2 "
                         r"workers\):$", output, re.M), output[-3000:]
        for w in (0, 1):
            assert re.search(rf"^\[worker {w}\] memory after step 1: peak RSS [\d.]+ [MG]iB",
                             output, re.M), output[-3000:]


def test_mixed_bfloat16_zero2_follows_plain(runs):
    """mixed_bfloat16 (float32 weights and moments, bfloat16 matmuls): zero2's losses and
    weights over 6 steps follow plain MWMS's within bfloat16's resolution. Both sum the
    same float32 gradients in another order (all-to-all + local sum vs all-reduce), so
    the weights differ by float32 rounding (~1e-7); through a bfloat16 cast (8 significant
    bits) such a difference can flip one rounding, which moves a loss by at most about one
    bfloat16 step, relative 2^-8 (the loss tolerance), and an AdamW update (~lr = 3e-3 per
    element) by about that fraction, ~1e-5 per step: the weight tolerance, 1e-4, allows a
    few such steps and is still 10x below one update, which a wrong shard would change.
    (Measured here: losses equal, weights within 6e-8.)"""
    plain, plain_output, _ = runs("none-mixed_bfloat16")
    workdir, output, _ = runs("zero2-mixed_bfloat16")
    for text in (plain_output, output):
        assert re.search(r"^\[worker 0\] stage .*; precision mixed_bfloat16;", text, re.M)
    np.testing.assert_allclose(train_losses(workdir), train_losses(plain), rtol=2**-8, atol=0)
    a, b = run_weights(plain), run_weights(workdir)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)
