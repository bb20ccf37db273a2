"""Every model family the presets cover trains under float32 and both mixed policies,
with and without XLA, under the default and the mirrored strategy.

Families (tiny dims, not the presets' sizes): dense GQA (tiny, small), hybrid
local/global attention, MLA, and MoE with each `topk_method` (noaux_tc with MTP as in
deepseek-v3-tiny / 671b, greedy softmax as in deepseek-v2-lite, group_limited_greedy).

The matrix, kept small but covering:
  - without XLA every family x every precision (18 short runs, ~1 s each): mixed
    precision bugs are dtype mismatches between layers, which show without XLA;
  - with XLA (3-8 s of compile each) a Latin-square selection: every family once and
    every precision at least twice, the MoE dispatch (the XLA-sensitive part: static
    buffers, scatter/gather, top-k) under all three precisions, and noaux_tc + MTP
    (the V3 presets' family) under both mixed policies;
  - mirrored (2 replicas) with MoE + MTP under both mixed policies, one with XLA.
Each run: 3 optimizer steps on one fixed batch with warmup 0, so the loss must fall.
"""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import OptimConfig, TrainConfig
from deepseek_tf.model import DeepSeekCausalLM
from deepseek_tf.train import precision
from deepseek_tf.train.optimizer import make_optimizer
from deepseek_tf.train.step import make_train_step
from deepseek_tf.train.strategy import make_strategy
from tests.helpers import tiny

MLA = dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8)
MOE = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
           moe_intermediate_size=8, n_group=4, topk_group=2, first_k_dense_replace=1,
           bias_update_speed=0.01, aux_loss_alpha=1e-3, router_z_loss_coef=1e-4)
FAMILIES = {
    "gqa": {},
    "hybrid": dict(attention_type="hybrid", hybrid_base="gqa", sliding_window=8),
    "mla": MLA,
    "moe_noaux_mtp": {**MLA, **MOE, "num_nextn_predict_layers": 1},
    "moe_greedy": {**MLA, **MOE, "topk_method": "greedy", "scoring_func": "softmax",
                   "n_group": 1, "topk_group": 1},
    "moe_group_limited": {**MOE, "topk_method": "group_limited_greedy",
                          "scoring_func": "softmax"},
}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
XLA_CASES = [("gqa", "mixed_float16"), ("hybrid", "mixed_bfloat16"), ("mla", "float32"),
             ("moe_noaux_mtp", "mixed_bfloat16"), ("moe_noaux_mtp", "mixed_float16"),
             ("moe_greedy", "float32"), ("moe_group_limited", "mixed_float16")]
BATCH, SEQ = 2, 32


def _batch(replicas: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(1, BATCH, SEQ + 1)).astype(np.int32)
    b = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
         "segment_ids": np.ones((1, BATCH, SEQ), np.int32),
         "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, BATCH, SEQ)).copy(),
         "loss_mask": np.ones((1, BATCH, SEQ), np.float32)}
    return iter(tf.data.Dataset.from_tensors(b).repeat())  # the same batch on every replica


def _short_run(family: str, policy: str, jit: bool, strategy=None, steps: int = 3):
    """Losses of `steps` trainer steps; checks the float32 islands on the way."""
    strategy = strategy or tf.distribute.get_strategy()
    cfg = tiny.model_config(**FAMILIES[family])
    tcfg = TrainConfig(batch_size=BATCH, jit_compile=jit, precision=policy)
    ocfg = OptimConfig(learning_rate=1e-2, warmup_steps=0)
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        with precision.policy_scope(policy):
            model = DeepSeekCausalLM(cfg)
        opt = precision.wrap_optimizer(make_optimizer(ocfg, 100, model), tcfg,
                                       model.trainable_variables)
        if not precision.is_loss_scaled(opt):
            opt.build(model.trainable_variables)
    assert all(v.dtype == "float32" for v in model.weights)
    for layer in model.moe_layers:  # router weights are read in float32 (never autocast)
        assert layer.gate.kernel._autocast is False
        if layer.gate.e_score_correction_bias is not None:
            assert layer.gate.e_score_correction_bias._autocast is False
    step = make_train_step(model, opt, strategy, tcfg, ocfg)
    it = _batch(strategy.num_replicas_in_sync)
    outs = [step(it) for _ in range(steps)]
    losses = [float(o["loss"]) for o in outs]
    assert all(np.isfinite(losses)), losses
    assert sum(float(o["skipped"]) for o in outs) == 0, "a step overflowed"
    assert losses[-1] < losses[0], losses
    if cfg.n_routed_experts:
        last = outs[-1]
        assert last["expert_load"].dtype == tf.float32
        assert np.isfinite(float(last["balance_loss"])) and np.isfinite(float(last["z_loss"]))
        if cfg.topk_method == "noaux_tc":
            assert float(tf.reduce_max(last["bias_spread"])) > 0  # the biases moved
    return losses


@pytest.mark.parametrize("policy", PRECISIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_without_xla(family, policy):
    _short_run(family, policy, jit=False)


@pytest.mark.parametrize("family,policy", XLA_CASES)
def test_family_trains_with_xla(family, policy):
    _short_run(family, policy, jit=True)


def test_xla_cases_cover_every_family_and_precision():
    assert {f for f, _ in XLA_CASES} == set(FAMILIES)
    assert {p for f, p in XLA_CASES if f.startswith("moe")} == set(PRECISIONS)


@pytest.mark.parametrize("policy,jit", [("mixed_bfloat16", True), ("mixed_float16", False)])
def test_moe_mtp_trains_mirrored(policy, jit):
    strategy = make_strategy(TrainConfig(strategy="mirrored"))  # shared in the process
    assert strategy.num_replicas_in_sync == 2
    _short_run("moe_noaux_mtp", policy, jit, strategy)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_router_outputs_stay_float32(policy):
    from deepseek_tf.layers.moe import DeepSeekMoE

    with precision.policy_scope(policy):
        moe = DeepSeekMoE(16, 8, 2, 8, n_shared_experts=1, n_group=4, topk_group=2)
    x = tf.random.normal((2, 5, 16))
    y, aux = moe(tf.cast(x, moe.compute_dtype), training=True, return_aux=True)
    assert y.dtype == moe.compute_dtype != tf.float32
    route = moe.gate(tf.cast(tf.reshape(x, (10, 16)), moe.compute_dtype))
    for key in ("logits", "scores", "weights"):
        assert route[key].dtype == tf.float32, key
    for key in ("load", "dropped", "balance_loss", "z_loss"):
        assert aux[key].dtype == tf.float32, key
    # The scores are those of float32 weights on the (16-bit rounded) input.
    x16 = tf.cast(tf.cast(tf.reshape(x, (10, 16)), moe.compute_dtype), tf.float32)
    ref = tf.sigmoid(tf.matmul(x16, tf.convert_to_tensor(moe.gate.kernel.value)))
    np.testing.assert_allclose(route["scores"].numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
