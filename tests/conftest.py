"""Shared fixtures. TF is imported once per pytest session (it takes seconds)."""

import gc
import os
import shutil
import sys
import tempfile

# TensorFlow's C++ log: errors too (level 2 still printed "failed call to cuInit" from
# each pytest-xdist worker into `make test`'s output). Tests of what users see remove
# the variable, as a user's shell has none.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One intra-op thread per TensorFlow process (this one and every process a test starts,
# which inherit the environment). `pytest -n 2` already runs two test processes on two
# cores, and the tiny models here are dominated by tracing, not by large kernels: more
# threads only spin against each other (a MoE accumulation test: 66 CPU-s with the
# default two, 56.5 with one).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# XLA's persistent compilation cache, on as in the commands (deepseek_tf/xla_cache.py),
# in one fresh directory per test run that pytest-xdist's workers and every process a
# test starts inherit: a run starts cold, as CI's does, and leaves nothing behind.
_OWN_XLA_CACHE = None
if "DEEPSEEK_TF_XLA_CACHE" not in os.environ:
    _OWN_XLA_CACHE = os.environ["DEEPSEEK_TF_XLA_CACHE"] = tempfile.mkdtemp(
        prefix="deepseek_tf_xla_")
from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs, so MirroredStrategy tests have two replicas in this process. This
# must run before any TensorFlow op; single-device code keeps using /cpu:0.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from tests.helpers import tiny  # noqa: E402


#: Test files with the most CPU time (their own and their subprocesses'; measured per
#: test with a `pytest_runtest_protocol` hook on the 2-core EPYC), most first. They are
#: collected first and `make test` passes `--no-loadscope-reorder` (else pytest-xdist
#: hands out the files with the most tests first), so `pytest -n 2 --dist loadfile`
#: starts them first and the two processes end together on short files, not one of
#: them alone on a long one.
HEAVY_FIRST = (
    "train/test_presets_multiworker.py", "train/test_precision_families.py",
    "export/test_saved_model.py", "train/test_multiworker.py", "train/test_sharding.py", "train/test_expert_parallel_zero.py",
    "train/test_expert_parallel.py", "train/test_expert_parallel_groups.py",
    "bench/test_smoke_sides.py",
    "convert/test_v32_parity.py", "train/test_dpo.py", "export/test_tflite.py",
    "generate/test_cli.py", "convert/test_hf_parity.py", "train/test_grpo.py",
    "train/test_grpo_runs.py", "generate/test_decode.py", "bench/test_smoke.py",
    "convert/test_fp8.py", "train/test_v4_training.py", "convert/test_v4_parity.py",
    "convert/test_fp4_v4.py", "train/test_moe_training.py", "train/test_finetune.py",
    "export/test_litertlm.py",
    "train/test_loop.py", "test_chat_flows.py", "export/test_chat.py", "train/test_cli.py",
    "test_entry_points.py", "train/test_precision.py")


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE and not hasattr(config, "workerinput"):  # the run's first process
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """A small prepared slice of the embedded corpus: (DataConfig, data_dir, metadata)."""
    from deepseek_tf.data.prepare import prepare

    cfg = tiny.data_config()
    data_dir = str(tmp_path_factory.mktemp("stdlib-data"))
    meta = prepare(cfg, data_dir, log=lambda *_: None)
    return cfg, data_dir, meta


@pytest.fixture(scope="session")
def one_shard_data(tmp_path_factory):
    """A prepared tiny corpus with a single train shard: the input pipelines of N workers
    take alternate windows of one stream, whose union per step is exactly the batch one
    process reads with the global batch size."""
    from deepseek_tf.data.prepare import prepare

    data_dir = str(tmp_path_factory.mktemp("one-shard") / "data")
    meta = prepare(tiny.data_config(shard_size_mb=16.0), data_dir, log=lambda *_: None)
    assert len(meta["splits"]["train"]["shards"]) == 1
    return data_dir


@pytest.fixture(scope="session")
def trained_moe_run(stdlib_data, tmp_path_factory):
    """An MLA + MoE model trained 12 steps on `stdlib_data` (it has learned the corpus'
    byte statistics): a distillation teacher, a perplexity-filter model. Its workdir."""
    from deepseek_tf.train.loop import train
    from tests.helpers.workdirs import FAMILIES

    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, model=FAMILIES["mla_moe"],
                          train={"steps": 12, "log_every": 12, "eval_every": 0,
                                 "checkpoint_every": 12},
                          optim={"learning_rate": 2e-2, "warmup_steps": 0})
    path = str(tmp_path_factory.mktemp("trained-moe") / "run")
    train(exp, path, log=lambda *_: None)
    return path


@pytest.fixture(scope="module", autouse=True)
def _collect_and_freeze_after_each_file():
    """One full garbage collection at the end of each test file, then everything still
    alive is frozen (`gc.freeze`: left out of later collections). A test process holds
    millions of objects after a few files (traced graphs, models of module fixtures),
    and Python's automatic full collections walked all of them again and again, each
    time in the middle of some later test (104 to 216 s per test process in three
    suite runs, the tf.data pauses of BUILD.md's "Known traps" included; 37 and 46 s
    with this)."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
    """Training turns TF op determinism on for the whole process (as a training process
    wants); a later test that serves or samples (unseeded requests draw seeds from the
    OS, which determinism forbids) must not inherit it. Each test starts with it off."""
    yield
    from tensorflow.python.framework import config as tf_config

    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()
