"""Expert parallelism (train/expert_parallel.py) on 2 local CPU workers through the
launcher: a `DeepSeekMoE` with `expert_parallel=2` (experts split over the workers,
tokens moved by all-to-all) equals the replicated layer (every worker all E experts,
gradients all-reduced), dropless and with a capacity that drops pairs. One launcher run
(tests/helpers/expert_parallel_check.py) shared by the tests.
"""

import json
import re

import pytest

from tests.helpers.launcher import Launcher

WORKERS = 2
TIMEOUT = 240  # seconds for the 2-worker check on a busy 2-core machine


@pytest.fixture(scope="module")
def checks():
    """{(capacity factor, worker): the worker's check line} of one launcher run."""
    launcher = Launcher(f"--num_workers={WORKERS}", f"--timeout={TIMEOUT}",
                        "--module=tests.helpers.expert_parallel_check")
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    rows = [json.loads(m) for m in re.findall(r"expert parallel check: (\{.*\})$", output, re.M)]
    assert len(rows) == 2 * WORKERS, output[-4000:]
    return {(r["factor"], r["rank"]): r for r in rows}


@pytest.mark.parametrize("factor", [0.0, 0.75])
def test_equals_replicated_moe(checks, factor):
    for rank in range(WORKERS):
        r = checks[(factor, rank)]
        assert abs(r["loss_ep"] - r["loss_ref"]) <= 1e-6, r
        assert r["y"] <= 1e-5, r
        assert r["expert_grads"] <= 1e-5 and r["expert_grad_scale"] > 1e-2, r
        assert r["other_grads"] <= 1e-5 and r["other_grad_scale"] > 1e-2, r  # router, shared
        assert r["token_grads"] <= 1e-5, r  # the backward all-to-alls return each row home
        assert r["dropped_ep"] == r["dropped_ref"], r
    assert checks[(factor, 0)]["loss_ep"] == checks[(factor, 1)]["loss_ep"]


def test_capacity_drops_alike(checks):
    """Factor 0.75 overflows some experts (the comparison covers dropping); 0 drops none."""
    assert checks[(0.75, 0)]["dropped_ep"] > 0
    assert checks[(0.0, 0)]["dropped_ep"] == 0


def test_each_worker_holds_its_share(checks):
    """Under the strategy's scope: 1/W of the expert stacks, as plain variables; the
    router and the shared expert mirrored."""
    for rank in range(WORKERS):
        r = checks[(0.0, rank)]
        assert r["expert_elements"] * WORKERS == r["stack_elements"], r
        assert not r["experts_mirrored"] and r["others_mirrored"], r
