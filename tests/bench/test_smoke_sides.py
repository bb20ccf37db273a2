"""The smoke runs of the benches that start TensorFlow or torch side processes (remat
modes, MultiWorkerMirroredStrategy workers, the transformers reference sides): the
checks of tests/bench/test_smoke.py, in a file of their own so that `pytest -n 2 --dist
loadfile` runs the two sets in parallel."""

import pytest

from tests.helpers.bench_smoke import SIDES, check_run, check_start_up, run_smoke


@pytest.fixture(scope="module")
def smoke():
    return run_smoke(SIDES)


@pytest.mark.parametrize("name", SIDES)
def test_smoke(smoke, name):
    check_run(smoke[0], name)


def test_no_tensorflow_start_up_lines(smoke):
    check_start_up(smoke[1])
