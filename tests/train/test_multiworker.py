"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1: equal to one process, and preemption.

Workers are real processes started by `python -m deepseek_tf.launch` in their own
process group, which the launcher kills on any failure or on its --timeout (and the
test kills the launcher's group on its own timeout). The data has a single train
shard, so the two input pipelines take alternate windows of one stream: their
union per step is exactly the batch one process reads with the global batch size.
"""

import os
import re
import signal
import time

import numpy as np
import tensorflow as tf

from deepseek_tf import exit_codes
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import checkpoint_tensors, nonfinite_tensors
from tests.helpers.launcher import Launcher, train_flags, weights_sha

STEPS = 6
TIMEOUT = 420  # seconds for one multi-worker run on a busy 2-core machine
quiet = lambda *_: None  # noqa: E731


# The tiny model with its second block a dropless DeepSeekMoE layer whose router
# biases move every step (aux-loss-free balancing from the all-reduced expert load).
MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
       "moe_intermediate_size": 16, "first_k_dense_replace": 1, "capacity_factor": 0.0,
       "bias_update_speed": 0.01}
BIAS = "e_score_correction_bias"


def _experiment(data_dir, batch_size, accum):
    return tiny.experiment(data_dir, model=MOE, data={"shuffle_buffer": 0},
                           optim={"clip_norm": 0.5},
                           train={"steps": STEPS, "batch_size": batch_size,
                                  "grad_accum_steps": accum, "log_every": 1, "eval_every": 3,
                                  "checkpoint_every": 3})


def test_two_workers_preempted_resumed_identical_and_equal_to_one_process(one_shard_data,
                                                                            tmp_path):
    """The launcher runs 2 workers (2 per replica x 2 accumulation steps) of the tiny
    model with one MoE layer; SIGTERM to
    worker 1 mid-run makes both save at the same step and exit 42; the same command then
    resumes both there. They end bitwise identical and equal to one process training
    with the global batch of 8 in one step."""
    workdir = str(tmp_path / "run")
    command = ["--num_workers=2", f"--timeout={TIMEOUT}", "--",
               *train_flags(_experiment(one_shard_data, batch_size=2, accum=2), workdir)]

    first = Launcher(*command)
    first.wait_for(r"^\[worker 1\] preemption:", timeout=TIMEOUT)
    pid = int(re.search(r"^\[launch\] worker 1: pid (\d+)", first.text(), re.M).group(1))
    os.kill(pid, signal.SIGTERM)
    assert first.finish(TIMEOUT) == exit_codes.PREEMPTED, first.text()[-3000:]
    saved = [re.findall(rf"^\[worker {w}\] .*saved a checkpoint at step (\d+)", first.text(),
                        re.M) for w in (0, 1)]
    assert saved[0] == saved[1] and len(saved[0]) == 1, first.text()[-3000:]
    step = int(saved[0][0])
    assert 0 < step < STEPS

    second = Launcher(*command)
    assert second.finish(TIMEOUT) == 0, second.text()[-3000:]
    output = second.text()
    for w in (0, 1):
        assert re.search(rf"^\[worker {w}\] resumed from .* at step {step}$", output, re.M)
    assert weights_sha(output, 0) == weights_sha(output, 1)  # bitwise-identical workers
    assert "global batch: 8 sequences = 2 per replica x 2 replicas x 2 accumulation" in output

    # Only the chief wrote logs, plot and checkpoints (each worker its data position).
    assert "[worker 1] step" not in output and "[worker 0] step      6/6" in output
    steps = [r["step"] for r in read_log(workdir) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert os.path.exists(os.path.join(workdir, "loss.svg"))
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert {n for n in names if not n.startswith("ckpt-")} == {
        "checkpoint", "data-worker-0", "data-worker-1"}

    # One process, one device, no accumulation, the same global batch of 8.
    single = str(tmp_path / "single")
    train(_experiment(one_shard_data, batch_size=8, accum=1), single, log=quiet)
    a, b = checkpoint_tensors(single), checkpoint_tensors(workdir)
    assert a.keys() == b.keys() and len(a) > 20
    biases = [k for k in a if BIAS in k]
    assert len(biases) == 1 and np.ptp(b[biases[0]]) > 0  # the biases moved, identically
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    losses = [[r["loss"] for r in read_log(d) if r["kind"] == "train"] for d in (single, workdir)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_nan_after_a_resume_rolls_every_worker_back_to_the_chiefs_checkpoint(one_shard_data,
                                                                              tmp_path):
    """Two workers train to step 2 (ckpt-2) and stop; the resumed run's gradients are NaN
    at step 3 (tests/helpers/nan_train.py). Every worker rolls back to the chief's ckpt-2
    (a non-chief's own saves go to a temporary directory that holds nothing yet after a
    resume), and both end with identical weights."""
    workdir = str(tmp_path / "run")

    def command(steps, *module):
        exp = tiny.experiment(one_shard_data, data={"shuffle_buffer": 0}, train={
            "steps": steps, "batch_size": 2, "log_every": 1, "eval_every": 0,
            "checkpoint_every": 2})
        return ["--num_workers=2", f"--timeout={TIMEOUT}", *module, "--",
                *train_flags(exp, workdir)]

    first = Launcher(*command(2))
    assert first.finish(TIMEOUT) == 0, first.text()[-3000:]
    second = Launcher(*command(4, "--module=tests.helpers.nan_train"),
                      env={"NAN_AT_STEP": "3"})
    assert second.finish(TIMEOUT) == 0, second.text()[-3000:]
    output = second.text()
    assert re.search(r"^\[worker 0\] recovery 1/3: gradients became non-finite at step 3; "
                     r"rolled back to ckpt-2", output, re.M), output[-3000:]
    assert weights_sha(output, 0) == weights_sha(output, 1)
    rows = read_log(workdir)
    assert [r["step"] for r in rows if r["kind"] == "recovery"] == [2]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_a_worker_killed_mid_run_stops_the_run_and_the_same_command_resumes(one_shard_data,
                                                                           tmp_path):
    """SIGKILL to worker 1 after the first checkpoint (every 2 steps): the launcher stops
    the run within seconds (the chief, waiting in a collective for its peer, is killed
    with the group) with one line naming the dead worker and how to resume; the last
    checkpoint is intact, and the same command resumes from it and finishes."""
    steps = 8
    exp = tiny.experiment(one_shard_data, data={"shuffle_buffer": 0},
                          train={"steps": steps, "batch_size": 2, "log_every": 1,
                                 "eval_every": 0, "checkpoint_every": 2})
    workdir = str(tmp_path / "run")
    command = ["--num_workers=2", f"--timeout={TIMEOUT}", "--", *train_flags(exp, workdir)]
    first = Launcher(*command)
    first.wait_for(rf"^\[worker 0\] step +3/{steps}", timeout=TIMEOUT)  # ckpt-2 is saved
    pid = int(re.search(r"^\[launch\] worker 1: pid (\d+)", first.text(), re.M).group(1))
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = first.finish(60)
    assert time.monotonic() - killed < 30, first.text()[-3000:]
    output = first.text()
    assert code == 128 + signal.SIGKILL, output[-3000:]
    assert re.search(r"^\[launch\] error: worker 1 died \(killed by SIGKILL\); stopping all "
                     r"workers; run the same command again to resume from the last "
                     r"checkpoint$", output, re.M), output[-3000:]
    assert f"[worker 0] step {steps:>6}/{steps}" not in output  # it stopped mid-run
    last = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    step = int(last.rsplit("-", 1)[1])
    assert step >= 2 and step % 2 == 0 and not nonfinite_tensors(last)
    assert len(checkpoint_tensors(last)) > 20  # readable

    second = Launcher(*command)
    assert second.finish(TIMEOUT) == 0, second.text()[-3000:]
    resumed = second.text()
    for w in (0, 1):
        assert re.search(rf"^\[worker {w}\] resumed from .*ckpt-{step} at step {step}$",
                         resumed, re.M), resumed[-3000:]
    assert weights_sha(resumed, 0) == weights_sha(resumed, 1)
    assert [r["step"] for r in read_log(workdir) if r["kind"] == "train"] == list(
        range(1, steps + 1))
