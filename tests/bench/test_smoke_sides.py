"""The smoke runs of the benches that start TensorFlow or torch side processes (remat
modes, MultiWorkerMirroredStrategy workers, the transformers reference sides): the
checks of tests/bench/test_smoke.py, in a file of their own so that `pytest -n 2 --dist
loadfile` runs the two sets in parallel."""

from tests.helpers.bench_smoke import SIDES, smoke_tests

smoke, test_smoke, test_no_tensorflow_start_up_lines = smoke_tests(SIDES)
