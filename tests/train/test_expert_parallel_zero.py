"""Expert parallelism combined with ZeRO (`--model.expert_parallel=2` with
`--train.shard_optimizer=zero1|zero2`) on 2 local CPU workers through the launcher.

One launcher run per mode (module fixture `runs`): a tiny DeepSeek-V3-style model (MLA,
MoE) with its experts split over the 2 workers, 8 steps of 2 accumulation micro-batches
with clipping that engages, NaN gradients at step 6 rolling every worker back to its
step-4 checkpoint (experts, their moments and the ZeRO shard). Reference: the same
expert-parallel run without sharding. Losses and final weights (experts gathered by
`load_workdir`) equal within 1e-6; each worker's checkpoint holds its half of the experts
and its half of the mirrored weights' moments; the zero2 run resumed from step 4 ends
bitwise equal; one process is refused in one line.
"""

import os
import re

import numpy as np
import pytest

from deepseek_tf.train.logger import read_log
from deepseek_tf.workdir import load_workdir
from tests.helpers import tiny
from tests.helpers.checkpoints import (assert_clipped_runs_equal, assert_resume_refused,
                                      assert_worker_states_equal, checkpoint_tensors,
                                      rewind, train_losses)
from tests.helpers.launcher import Launcher, train_flags, weights_sha
from tests.helpers.workdirs import FAMILIES

WORKERS = 2
STEPS = 8
NAN_AT = 6  # every run rolls back from a NaN at step 6 to ckpt-4 and goes on
TIMEOUT = 300  # seconds for one 2-worker run on a busy 2-core machine
OWN = r"^\[worker {}\] this worker's expert weights sha256: (\w+)$"


def _experiment(data_dir, mode):
    return tiny.experiment(data_dir, data={"shuffle_buffer": 0}, optim={"clip_norm": 0.5},
                           model={**FAMILIES["mla_moe"], "expert_parallel": WORKERS},
                           train={"steps": STEPS, "batch_size": 2, "grad_accum_steps": 2,
                                  "log_every": 1, "eval_every": STEPS, "checkpoint_every": 4,
                                  "jit_compile": "false", "shard_optimizer": mode})


def _launch(exp, workdir):
    """Runs `exp` on 2 workers with NaN gradients at step NAN_AT (tests/helpers/nan_train);
    returns the output, the workers' weights sha (they agree) and their experts' shas."""
    launcher = Launcher(f"--num_workers={WORKERS}", f"--timeout={TIMEOUT}",
                        "--module=tests.helpers.nan_train", "--", *train_flags(exp, workdir),
                        env={"NAN_AT_STEP": str(NAN_AT)})
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    sha = weights_sha(output, 0)
    assert weights_sha(output, 1) == sha, output[-4000:]
    own = [re.findall(OWN.format(w), output, re.M) for w in range(WORKERS)]
    assert all(len(o) == 1 for o in own) and own[0] != own[1], output[-4000:]
    return output, sha, own


@pytest.fixture(scope="module")
def runs(one_shard_data, tmp_path_factory):
    """{mode: (workdir, output, weights sha, experts' shas)} of the runs, made on first use."""
    root, done = tmp_path_factory.mktemp("ep-zero"), {}

    def get(mode):
        if mode not in done:
            workdir = str(root / mode)
            done[mode] = (workdir, *_launch(_experiment(one_shard_data, mode), workdir))
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["zero1", "zero2"])
def test_sharded_equals_expert_parallel_alone(runs, mode):
    """Losses and final weights (experts gathered) equal the unsharded expert-parallel
    run's within 1e-6, with accumulation, clipping, capacity drops and a NaN rollback."""
    plain = runs("none")[0]
    workdir, output, _, _ = runs(mode)
    for d in (plain, workdir):
        assert [r["step"] for r in read_log(d) if r["kind"] == "recovery"] == [4]
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] optimizer sharding: {mode} over 2 workers: this "
                         rf"worker keeps AdamW moments of [\d,]+ of [\d,]+ weights", output,
                         re.M), output[-4000:]
        assert re.search(rf"^\[worker {w}\] expert parallel over 2 workers: this worker "
                         rf"holds 6,144 of 12,288 routed-expert weights", output, re.M)
    assert re.search(r"moe max/mean load [\d.]+, dropped [1-9]", output)  # drops happen
    # the global norm: the mirrored shards' and every worker's experts' squares
    assert_clipped_runs_equal(workdir, plain, STEPS, 1e-6, clipped=4)


def test_each_worker_checkpoints_its_experts_and_its_moment_shard(runs):
    """Measured in the checkpoints of the zero2 run: worker i's own checkpoint holds half
    the expert stacks (and their two moments) and a half shard of the mirrored weights'
    moments; the main checkpoint holds no moments."""
    workdir = runs("zero2")[0]
    model, _ = load_workdir(workdir)  # the experts gathered
    is_expert = [v.path.endswith(("gate_up_proj", "down_proj"))
                 for v in model.trainable_variables]
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    stacks = sum(n for n, e in zip(sizes, is_expert) if e)
    mirrored = sum(n for n, e in zip(sizes, is_expert) if not e)
    main = checkpoint_tensors(workdir, ("optimizer/",))
    assert all(t.size == 1 for t in main.values()), {k: t.shape for k, t in main.items()}
    for w in range(WORKERS):
        path = os.path.join(workdir, "checkpoints", f"data-worker-{w}", f"ckpt-{STEPS}")
        mine = checkpoint_tensors(path, ("experts/", "optimizer_shard/"))
        for part in ("experts", "m", "v"):
            held = sum(t.size for k, t in mine.items() if k.startswith(f"experts/{part}/"))
            assert held * WORKERS == stacks, (part, held, stacks)
        shard = sorted(t.shape for k, t in mine.items() if k.startswith("optimizer_shard/"))
        assert shard == [(-(-mirrored // WORKERS),)] * 2, (shard, mirrored)


def test_zero2_resumes_bitwise(runs, one_shard_data, tmp_path):
    """The zero2 run rewound to its step-4 checkpoint and resumed (its NaN at step 6 and
    rollback included) ends bitwise equal: mirrored weights, each worker's experts and
    each worker's ZeRO shard."""
    straight, _, sha, own = runs("zero2")
    workdir = rewind(straight, str(tmp_path / "resumed"), 4)
    output, resumed_sha, resumed_own = _launch(_experiment(one_shard_data, "zero2"), workdir)
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] resumed from .*ckpt-4 at step 4$", output, re.M)
    assert (resumed_sha, resumed_own) == (sha, own)
    assert_worker_states_equal(workdir, straight, WORKERS, STEPS)
    assert train_losses(workdir) == train_losses(straight)


def test_one_process_is_refused(runs, tmp_path):
    """The combined run resumed by one process: refused in one line, checkpoints kept."""
    assert_resume_refused(runs("zero2")[0], str(tmp_path / "one"),
                          r"--model.expert_parallel=2 places the experts on groups of 2 workers, and "
                          r"this run has 1 worker\(s\)")
