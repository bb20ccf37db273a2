"""Every script in bench/ runs in `--smoke` mode (tiny sizes, one round, reference sides
included), exits cleanly, prints the machine line and its result lines, and keeps
TensorFlow's start-up lines off the console. This file: the benches that run in one
process (tests/bench/smoke_runner.py: TensorFlow imported once); those that start side
processes run in tests/bench/test_smoke_sides.py, in parallel under `pytest -n 2`."""

import glob
import os

import pytest

from tests.helpers.bench_smoke import (IN_PROCESS, RESULTS, ROOT, check_run, check_start_up,
                                       run_smoke)


def test_every_bench_script_is_smoke_tested():
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
    # common: the plumbing; hf_*: the transformers sides of compare_hf and decode;
    # convert_memory: its smoke run measures a child's peak RSS, in
    # tests/convert/test_convert_memory.py.
    assert scripts - {"common", "hf_train", "hf_decode", "convert_memory"} == set(RESULTS)


@pytest.fixture(scope="module")
def smoke():
    return run_smoke(IN_PROCESS)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_smoke(smoke, name):
    check_run(smoke[0], name)


def test_no_tensorflow_start_up_lines(smoke):
    check_start_up(smoke[1])
