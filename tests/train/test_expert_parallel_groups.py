"""Expert parallelism over groups (`--model.expert_parallel=2` on 4 local CPU workers,
through the launcher): two expert-parallel groups of 2 workers ({0, 1}, {2, 3}), each
holding every expert once; workers {0, 2} and {1, 3} are replicas of one half of them.

One launcher run each (module fixture `runs`): the replicated MoE (plain
MultiWorkerMirroredStrategy on 4 workers), expert_parallel=2, and expert_parallel=2 with
zero2; a tiny DeepSeek-V3-style model, 4 steps of 2 accumulation micro-batches with
clipping that engages and capacity drops. Losses, logged gradient norms and the final
weights (experts gathered by `load_workdir`) equal the replicated run's within 1e-5;
replicas hold the same experts; the zero2 run resumed from its step-2 checkpoint ends
bitwise equal; a worker count W does not divide is refused in one line.
"""

import re

import pytest

from tests.helpers import tiny
from tests.helpers.checkpoints import (assert_clipped_runs_equal, assert_resume_refused,
                                      assert_worker_states_equal, rewind, train_losses)
from tests.helpers.launcher import Launcher, train_flags, weights_sha
from tests.helpers.workdirs import FAMILIES

WORKERS, WAYS = 4, 2
STEPS = 4
TIMEOUT = 300  # seconds for one 4-worker run on a busy 2-core machine
OWN = r"^\[worker {}\] this worker's expert weights sha256: (\w+)$"


def _experiment(data_dir, ways, shard="none"):
    return tiny.experiment(data_dir, data={"shuffle_buffer": 0}, optim={"clip_norm": 0.5},
                           model={**FAMILIES["mla_moe"], "expert_parallel": ways},
                           train={"steps": STEPS, "batch_size": 2, "grad_accum_steps": 2,
                                  "log_every": 1, "eval_every": STEPS,
                                  "checkpoint_every": 2, "jit_compile": "false",
                                  "shard_optimizer": shard})


def _launch(exp, workdir):
    """Runs `exp` on 4 workers; returns the output (every worker ended on the same
    mirrored weights)."""
    launcher = Launcher(f"--num_workers={WORKERS}", f"--timeout={TIMEOUT}", "--",
                        *train_flags(exp, workdir))
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    assert len({weights_sha(output, w) for w in range(WORKERS)}) == 1, output[-4000:]
    return output


@pytest.fixture(scope="module")
def runs(one_shard_data, tmp_path_factory):
    """{(ways, shard): (workdir, output)} of the 4-worker runs, made on first use."""
    root, done = tmp_path_factory.mktemp("ep-groups"), {}

    def get(ways, shard="none"):
        if (ways, shard) not in done:
            workdir = str(root / f"ep{ways}-{shard}")
            done[ways, shard] = workdir, _launch(_experiment(one_shard_data, ways, shard),
                                                 workdir)
        return done[ways, shard]

    return get


@pytest.mark.parametrize("shard", ["none", "zero2"])
def test_two_groups_equal_replicated_moe(runs, shard):
    """Losses, gradient norms (each half of the experts counted once) and weights equal
    the replicated MoE on 4 workers within 1e-5; worker r holds half r mod 2 of the
    experts, the same as its replica r + 2 (their gradients summed over both)."""
    replicated, _ = runs(1)
    workdir, output = runs(WAYS, shard)
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] expert parallel over 2 workers: this worker holds "
                         rf"6,144 of 12,288 routed-expert weights \(and their AdamW "
                         rf"moments\), each block on 2 workers", output, re.M), output[-3000:]
    own = [re.findall(OWN.format(w), output, re.M) for w in range(WORKERS)]
    assert all(len(o) == 1 for o in own), output[-3000:]
    assert own[0] == own[2] != own[1] == own[3]  # replicas agree, the halves differ
    assert re.search(r"moe max/mean load [\d.]+, dropped [1-9]", output)  # drops happen
    assert_clipped_runs_equal(workdir, replicated, STEPS, 1e-5, clipped=2)


def test_worker_count_ways_do_not_divide_is_refused(runs, tmp_path):
    """The W = 2 run resumed by one process (2 does not divide 1): one line, checkpoints
    left alone."""
    assert_resume_refused(runs(WAYS)[0], str(tmp_path / "one"),
                          r"--model.expert_parallel=2 places the experts on groups of 2 "
                          r"workers, and this run has 1 worker\(s\)")


def test_resumes_bitwise(runs, one_shard_data, tmp_path):
    """The W = 2 + zero2 run rewound to step 2 and resumed on 4 workers ends bitwise equal:
    mirrored weights, each worker's experts, their moments and its ZeRO shard."""
    straight, output = runs(WAYS, "zero2")
    workdir = rewind(straight, str(tmp_path / "resumed"), 2)
    resumed = _launch(_experiment(one_shard_data, WAYS, "zero2"), workdir)
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] resumed from .*ckpt-2 at step 2$", resumed, re.M)
        assert weights_sha(resumed, w) == weights_sha(output, w)
        own = OWN.format(w)
        assert re.findall(own, resumed, re.M) == re.findall(own, output, re.M) != []
    assert_worker_states_equal(workdir, straight, WORKERS, STEPS)
    assert train_losses(workdir) == train_losses(straight)
