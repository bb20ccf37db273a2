"""The training loop with MoE and MTP: aux losses and load metrics are logged, the router
biases move, D=0 and D=1 both learn, and resume stays bitwise with the biases."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment, ModelConfig, TrainConfig
from deepseek_tf.errors import ConfigError
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import rewind
from tests.train.test_loop import _train_losses, _weights

quiet = lambda *_: None  # noqa: E731

MOE = dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, moe_intermediate_size=8, n_group=4, topk_group=2,
           first_k_dense_replace=1, bias_update_speed=0.01, aux_loss_alpha=1e-3,
           router_z_loss_coef=1e-4)


@pytest.mark.parametrize("depth", [0, 1])
def test_moe_run_learns_logs_aux_and_moves_biases(stdlib_data, tmp_path, depth):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, model={**MOE, "num_nextn_predict_layers": depth},
                          train={"steps": 16, "log_every": 4, "eval_every": 0})
    train(exp, str(tmp_path), log=quiet)
    rows = [r for r in read_log(str(tmp_path)) if r["kind"] == "train"]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    last = rows[-1]
    assert ("mtp_loss" in last) == bool(depth)
    if depth:
        assert all(np.isfinite(r["mtp_loss"]) for r in rows)
        assert rows[-1]["mtp_loss"] < rows[0]["mtp_loss"]
    assert last["balance_loss"] >= 0.99 and np.isfinite(last["z_loss"])  # 1 = balanced
    layers = [1] + ([2] if depth else [])       # MoE block 1 (+ the MTP block, index 2)
    for i in layers:
        load = last[f"moe/layer{i}/load"]
        assert len(load) == 8 and abs(sum(load) - 1) < 1e-5
        assert 0 <= last[f"moe/layer{i}/dropped_frac"] < 1
        # sign steps of 0.01: after 16 steps the spread is at most 2 * 16 * 0.01
        spreads = [r[f"moe/layer{i}/bias_spread"] for r in rows]
        assert max(spreads) > 0 and max(spreads) <= 0.32 + 1e-6
    weights = _weights(str(tmp_path))
    biases = [k for k in weights if "e_score_correction_bias" in k]
    assert len(biases) == len(layers) and all(np.ptp(weights[k]) > 0 for k in biases)


def test_moe_mtp_resume_is_bitwise_identical(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    n = 3
    model = {**MOE, "num_nextn_predict_layers": 1}
    common = dict(model=model, optim={"decay_steps": 2 * n})
    full = tiny.experiment(data_dir, **common, train={"steps": 2 * n, "log_every": 1,
                                                      "checkpoint_every": n, "eval_every": 0})
    a = str(tmp_path / "full")
    train(full, a, log=quiet)
    b = rewind(a, str(tmp_path / "resumed"), n)  # as if it had stopped at step n
    msgs = []
    train(full, b, log=msgs.append)
    assert any(f"at step {n}" in m for m in msgs), msgs
    wa, wb = _weights(a), _weights(b)
    assert any("e_score_correction_bias" in k for k in wa)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert _train_losses(a) == _train_losses(b)


def test_dropless_moe_is_refused_under_xla():
    with pytest.raises(ConfigError, match="capacity_factor"):
        Experiment(model=ModelConfig(n_routed_experts=4, capacity_factor=0.0),
                   train=TrainConfig(jit_compile=True))
    Experiment(model=ModelConfig(n_routed_experts=4, capacity_factor=0.0))  # fine without XLA
    assert tf.__version__


def test_moe_mtp_accumulation_equals_the_large_batch_step(stdlib_data, tmp_path):
    """Aux stats (expert load, MTP loss sums) go through the accumulation loop like the
    gradients: dropless routing makes two half batches equal one full batch."""
    _, data_dir, _ = stdlib_data
    model = {**MOE, "num_nextn_predict_layers": 1, "capacity_factor": 0.0,
             "aux_loss_alpha": 0.0, "router_z_loss_coef": 0.0}
    common = {"data": {"shuffle_buffer": 0}, "model": model}
    big = tiny.experiment(data_dir, **common, train={"steps": 2, "batch_size": 4,
                                                     "eval_every": 0, "log_every": 1})
    acc = tiny.experiment(data_dir, **common, train={"steps": 2, "batch_size": 2,
                                                     "grad_accum_steps": 2, "eval_every": 0,
                                                     "log_every": 1})
    train(big, str(tmp_path / "big"), log=quiet)
    train(acc, str(tmp_path / "acc"), log=quiet)
    wa, wb = _weights(str(tmp_path / "big")), _weights(str(tmp_path / "acc"))
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=2e-6, rtol=1e-5, err_msg=k)
    ra = [r for r in read_log(str(tmp_path / "big")) if r["kind"] == "train"]
    rb = [r for r in read_log(str(tmp_path / "acc")) if r["kind"] == "train"]
    for x, y in zip(ra, rb):
        assert x["moe/layer1/load"] == y["moe/layer1/load"]
        np.testing.assert_allclose(x["mtp_loss"], y["mtp_loss"], rtol=1e-5)
