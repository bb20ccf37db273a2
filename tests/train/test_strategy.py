"""Strategy choice, cluster roles, and MirroredStrategy (2 logical CPUs) == one device."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import TrainConfig
from deepseek_tf.errors import UserError
from deepseek_tf.train import strategy as strategy_lib
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from deepseek_tf.train.objectives import prepare_run
from tests.helpers import tiny
from tests.helpers.checkpoints import checkpoint_tensors

quiet = lambda *_: None  # noqa: E731


def _env(cluster, task_type="worker", index=0):
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": task_type, "index": index}})}


def test_roles_come_from_tf_config():
    assert strategy_lib.cluster_role({}) == strategy_lib.Role()
    assert strategy_lib.cluster_role({}).is_chief
    two = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    w0, w1 = (strategy_lib.cluster_role(_env(two, index=i)) for i in (0, 1))
    assert (w0.is_chief, w0.index, w0.num_workers) == (True, 0, 2)
    assert (w1.is_chief, w1.index, w1.num_workers) == (False, 1, 2)
    with_chief = {"chief": ["h:1"], "worker": ["h:2", "h:3"]}
    chief = strategy_lib.cluster_role(_env(with_chief, "chief", 0))
    w0 = strategy_lib.cluster_role(_env(with_chief, "worker", 0))
    assert chief.is_chief and chief.index == 0 and chief.num_workers == 3
    assert not w0.is_chief and w0.index == 1


@pytest.mark.parametrize("raw,needle", [
    ("{not json", "not valid"),
    (json.dumps({"cluster": {"worker": ["h:1"]}}), "not valid"),
    (json.dumps({"cluster": {"worker": ["h:1"], "ps": ["h:2"]},
                 "task": {"type": "worker", "index": 0}}), "'chief' and 'worker'"),
    (json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}}),
     "not in its cluster"),
])
def test_bad_tf_config_is_one_clear_error(raw, needle):
    with pytest.raises(UserError, match=needle):
        strategy_lib.cluster_role({"TF_CONFIG": raw})


def test_auto_strategy_follows_the_environment():
    two = _env({"worker": ["h:1", "h:2"]})
    assert strategy_lib.strategy_name(TrainConfig(), two) == "multi_worker"
    assert strategy_lib.strategy_name(TrainConfig(), {}) == "default"  # no GPUs here
    assert strategy_lib.strategy_name(TrainConfig(strategy="mirrored"), two) == "mirrored"


def test_mirrored_two_cpus_with_accumulation_equals_the_large_batch_step(stdlib_data, tmp_path):
    """2 replicas x 2 per replica x 2 accumulation steps == one device, one batch of 8."""
    _, data_dir, _ = stdlib_data
    common = {"data": {"shuffle_buffer": 0}, "optim": {"clip_norm": 0.5}}
    big = tiny.experiment(data_dir, **common, train={
        "steps": 3, "batch_size": 8, "eval_every": 0, "log_every": 1})
    mirrored = tiny.experiment(data_dir, **common, train={
        "steps": 3, "batch_size": 2, "grad_accum_steps": 2, "strategy": "mirrored",
        "eval_every": 0, "log_every": 1})
    msgs = []
    train(big, str(tmp_path / "big"), log=quiet)
    result = train(mirrored, str(tmp_path / "mirrored"), log=msgs.append)
    assert any("MirroredStrategy, 2 replicas" in m for m in msgs), msgs
    assert any(m.startswith("global batch: 8 sequences = 2 per replica x 2 replicas x 2 "
                            "accumulation") for m in msgs), msgs
    wa, wb = (checkpoint_tensors(str(tmp_path / d)) for d in ("big", "mirrored"))
    assert wa.keys() == wb.keys() and len(wa) > 20
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, rtol=1e-5, err_msg=k)
    losses = [[r["loss"] for r in read_log(str(tmp_path / d)) if r["kind"] == "train"]
              for d in ("big", "mirrored")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert result["eval"]["loss"] > 0


def test_collectives_are_no_ops_with_one_worker():
    c = strategy_lib.Collectives(tf.distribute.get_strategy())
    assert not c.active
    c.barrier()
    c.check_same(7, "step")


def test_a_worker_waits_for_the_chiefs_data_and_says_what_to_do(tmp_path):
    exp = tiny.experiment(str(tmp_path / "missing"), train={"collective_timeout": 0.5})
    role = strategy_lib.Role("worker", 1, 2)
    msgs = []
    with pytest.raises(UserError, match="shared --workdir"):
        prepare_run(exp, str(tmp_path / "w"), log=msgs.append, role=role)
    assert msgs == [f"waiting for the chief to prepare {tmp_path / 'missing'}"]
    assert not (tmp_path / "missing").exists()  # only the chief prepares
