"""Mixed precision: float32 islands, a global overflow decision, no non-finite checkpoint."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.model import DeepSeekCausalLM
from deepseek_tf.train import precision
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.objectives import TokenObjective
from deepseek_tf.train.loop import build_state, train
from deepseek_tf.train.step import make_train_step
from deepseek_tf.train.strategy import Role
from tests.helpers import tiny
from tests.helpers.checkpoints import all_checkpoints, nonfinite_tensors
from tests.train.test_precision_families import FAMILIES

quiet = lambda *_: None  # noqa: E731
MOE_MTP = {k: v for k, v in FAMILIES["moe_noaux_mtp"].items() if k != "bias_update_speed"}


@pytest.mark.parametrize("policy,compute", [("mixed_float16", tf.float16),
                                            ("mixed_bfloat16", tf.bfloat16)])
def test_mixed_policy_computes_in_16_bits_and_keeps_float32_islands(policy, compute):
    cfg = tiny.model_config()
    ref = DeepSeekCausalLM(cfg)
    with precision.policy_scope(policy):
        model = DeepSeekCausalLM(cfg)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    assert all(v.dtype == "float32" for v in model.weights)  # float32 master weights
    model.set_weights(ref.get_weights())
    tokens = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 16)), tf.int32)
    hidden = model.embed_tokens(tokens)
    assert hidden.dtype == compute
    norm = model.blocks[0].input_layernorm
    assert norm.scale._autocast is False  # the RMSNorm scale is read in float32
    assert norm(hidden).dtype == compute  # statistics in float32, output cast back
    logits = model(tokens)
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), ref(tokens).numpy(), atol=0.05)


def _inject_inf_on_replica(replica: int, flag: tf.Variable):
    """A grad_hook that puts inf into one replica's gradients while `flag` is set."""

    def hook(grads, replica_id):
        hit = tf.logical_and(tf.equal(replica_id, replica), flag)
        return [grads[0] + tf.where(hit, float("inf"), 0.0)] + list(grads[1:])

    return hook


def _replica_copies(variable):
    return [v.numpy() for v in variable.value.values]


@pytest.mark.parametrize("model", [{}, {**MOE_MTP, "bias_update_speed": 0.01}],
                         ids=["dense", "moe_mtp"])
def test_inf_on_one_replica_skips_the_step_on_every_replica(stdlib_data, tmp_path, model):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, model=model, optim={"warmup_steps": 0},  # lr > 0 at once
                          train={"strategy": "mirrored", "precision": "mixed_float16",
                                 "batch_size": 2})
    objective = TokenObjective()
    exp = objective.prepare(exp, str(tmp_path), Role(), quiet)
    state = build_state(exp, str(tmp_path), objective)
    assert state.strategy.num_replicas_in_sync == 2
    flag = tf.Variable(True, trainable=False)
    step = make_train_step(state.model, state.optimizer, state.strategy, exp.train, exp.optim,
                           grad_hook=_inject_inf_on_replica(1, flag))
    variables = state.model.trainable_variables
    biases = [l.gate.e_score_correction_bias for l in state.model.moe_layers]
    before = [_replica_copies(v) for v in variables]
    biases_before = [_replica_copies(b) for b in biases]
    scale0 = precision.current_scale(state.optimizer)

    out = step(state.train_iter)  # replica 1 overflows, replica 0 does not
    assert float(out["skipped"]) == 1.0
    assert int(state.optimizer.iterations.numpy()) == 0
    assert precision.current_scale(state.optimizer) == scale0 / 2
    for v, copies in zip(variables, before):
        for now, then in zip(_replica_copies(v), copies):
            np.testing.assert_array_equal(now, then, err_msg=v.path)  # nobody applied it
    for b, copies in zip(biases, biases_before):  # nor moved a router bias
        for now, then in zip(_replica_copies(b), copies):
            np.testing.assert_array_equal(now, then, err_msg=b.path)

    flag.assign(False)
    out = step(state.train_iter)
    assert float(out["skipped"]) == 0.0 and np.isfinite(float(out["loss"]))
    assert int(state.optimizer.iterations.numpy()) == 1
    changed = 0
    for v, copies in zip(variables, before):
        a, b = _replica_copies(v)
        np.testing.assert_array_equal(a, b, err_msg=v.path)  # replicas stay identical
        assert np.all(np.isfinite(a)), v.path
        changed += not np.array_equal(a, copies[0])
    assert changed == len(variables)
    for b, copies in zip(biases, biases_before):
        a, c = _replica_copies(b)
        np.testing.assert_array_equal(a, c, err_msg=b.path)
        assert not np.array_equal(a, copies[0]), b.path  # moved on the good step


def test_overflowing_float16_run_skips_steps_and_never_checkpoints_nonfinite(stdlib_data,
                                                                             tmp_path):
    """A loss scale of 2^24 overflows this model's float16 gradients: steps are skipped,
    the scale halves until training proceeds, and every checkpoint is finite."""
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={
        "steps": 10, "precision": "mixed_float16", "initial_loss_scale": 2.0 ** 24,
        "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 20, "eval_every": 0})
    result = train(exp, str(tmp_path), log=quiet)
    rows = [r for r in read_log(str(tmp_path)) if r["kind"] == "train"]
    skipped = [r["skipped_steps"] for r in rows]
    scales = [r["loss_scale"] for r in rows]
    assert skipped[0] == 1 and 1 < result["skipped_steps"] <= 8, skipped
    assert skipped[-1] == skipped[-2] == result["skipped_steps"]  # then it trains
    assert skipped == sorted(skipped) and scales[-1] < 2.0 ** 24
    assert all(b == a / 2 for a, b, s0, s1 in zip(scales, scales[1:], skipped, skipped[1:])
               if s1 > s0)  # each skip halves the scale
    assert np.isfinite(result["eval"]["loss"])
    paths = all_checkpoints(str(tmp_path))
    assert len(paths) == 10
    for path in paths:
        assert not nonfinite_tensors(path), path


def test_float32_run_stops_on_nonfinite_gradients_before_checkpointing(stdlib_data, tmp_path,
                                                                        monkeypatch):
    """Without loss scaling and with recovery off a non-finite step stops the run with
    one clear error and keeps the last good checkpoint (train/recovery.py rolls back
    instead by default: tests/train/test_recovery.py)."""
    from deepseek_tf.train import loop

    _, data_dir, _ = stdlib_data
    real = loop.make_train_step

    def with_fault(model, optimizer, *args, **kwargs):
        def hook(grads, replica_id):  # inf from the 3rd step on
            return [grads[0] + tf.where(optimizer.iterations >= 2, float("inf"), 0.0)] + \
                list(grads[1:])
        return real(model, optimizer, *args, grad_hook=hook, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", with_fault)
    exp = tiny.experiment(data_dir, train={"steps": 6, "checkpoint_every": 2, "eval_every": 0,
                                           "recovery_max_trials": 0})
    with pytest.raises(UserError, match="gradients became non-finite at step 3"):
        train(exp, str(tmp_path), log=quiet)
    paths = all_checkpoints(str(tmp_path))
    assert [p.rsplit("-", 1)[1] for p in paths] == ["2"]
    assert not nonfinite_tensors(paths[0])
