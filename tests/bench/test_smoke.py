"""Every script in bench/ runs in `--smoke` mode (tiny sizes, one round, reference sides
included), exits cleanly, prints the machine line and its result lines, and keeps
TensorFlow's start-up lines off the console. This file: the benches that run in one
process (tests/bench/smoke_runner.py: TensorFlow imported once); those that start side
processes run in tests/bench/test_smoke_sides.py, in parallel under `pytest -n 2`."""

import glob
import os

from tests.helpers.bench_smoke import IN_PROCESS, RESULTS, ROOT, smoke_tests


def test_every_bench_script_is_smoke_tested():
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))}
    # common: the plumbing; hf_*: the transformers sides of compare_hf and decode;
    # convert_memory: its smoke run measures a child's peak RSS, in
    # tests/convert/test_convert_memory.py.
    assert scripts - {"common", "hf_train", "hf_decode", "convert_memory"} == set(RESULTS)


smoke, test_smoke, test_no_tensorflow_start_up_lines = smoke_tests(IN_PROCESS)
