"""DeepSeekMoE: router vs numpy, sparse dispatch vs a dense reference, dropping,
the balance loss on a hand-computed case, and the aux-loss-free bias update."""

import types

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.moe import DeepSeekMoE, dispatch_combine, expert_capacity
from deepseek_tf.layers.router import TopkRouter, router_z_loss, sequence_balance_loss
from deepseek_tf.train.aux_losses import update_router_biases
from tests.helpers.layer_checks import check_layer


def _router_reference(x, kernel, bias, k, scoring, method, groups, topk_group, norm, scale):
    logits = x.astype(np.float64) @ kernel
    if scoring == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores + (bias if method == "noaux_tc" else 0)
    n, e = scores.shape
    idx = np.zeros((n, k), int)
    for t in range(n):
        allowed = np.ones(e, bool)
        if method != "greedy" and groups > 1:
            g = choice[t].reshape(groups, -1)
            gs = np.sort(g, -1)[:, -2:].sum(-1) if method == "noaux_tc" else g.max(-1)
            keep = np.argsort(-gs)[:topk_group]
            allowed = np.isin(np.arange(e) // (e // groups), keep)
        c = np.where(allowed, choice[t], -np.inf)
        idx[t] = np.argsort(-c)[:k]
    w = np.take_along_axis(scores, idx, 1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * scale


@pytest.mark.parametrize("scoring,method,groups,topk_group,norm", [
    ("sigmoid", "noaux_tc", 4, 2, True), ("softmax", "group_limited_greedy", 4, 1, False),
    ("softmax", "greedy", 1, 1, False), ("sigmoid", "greedy", 1, 1, True)])
def test_router_matches_numpy_reference(scoring, method, groups, topk_group, norm):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    router = TopkRouter(8, 2, scoring, method, groups, topk_group, norm, 2.5,
                        initializer_range=0.5)
    out = check_layer(router, (tf.constant(x),), expected_shape=(40, 2), output_key="weights")
    bias = rng.normal(size=8).astype(np.float32) * 0.3
    if method == "noaux_tc":
        router.e_score_correction_bias.assign(bias)
        out = router(tf.constant(x))
        assert not router.e_score_correction_bias.trainable
    else:
        assert router.e_score_correction_bias is None
    idx, w = _router_reference(x, router.kernel.numpy(), bias, 2, scoring, method, groups,
                               topk_group, norm, 2.5)
    got_idx, got_w = out["indices"].numpy(), out["weights"].numpy()
    order = np.argsort(got_idx, 1), np.argsort(idx, 1)
    np.testing.assert_array_equal(np.take_along_axis(got_idx, order[0], 1),
                                  np.take_along_axis(idx, order[1], 1))
    np.testing.assert_allclose(np.take_along_axis(got_w, order[0], 1),
                               np.take_along_axis(w, order[1], 1), rtol=1e-5)


def _experts_reference(moe, x, idx, w, keep=None):
    """sum_k w_k * expert_k(x) (+ shared experts), per token, in numpy."""
    gu, down, f = moe.gate_up_proj.numpy(), moe.down_proj.numpy(), moe.moe_intermediate_size
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if keep is not None and not keep[n, j]:
                continue
            e = idx[n, j]
            h = x[n] @ gu[e]
            y[n] += w[n, j] * ((silu(h[:f]) * h[f:]) @ down[e])
    if moe.shared_experts is not None:
        y += moe.shared_experts(x[None]).numpy()[0]
    return y


def _moe(**kw):
    return DeepSeekMoE(hidden_size=16, num_experts=8, top_k=2, moe_intermediate_size=8,
                       n_shared_experts=1, n_group=4, topk_group=2, initializer_range=0.3, **kw)


def test_dropless_moe_equals_dense_reference():
    x = np.random.default_rng(1).normal(size=(2, 9, 16)).astype(np.float32)
    moe = _moe(capacity_factor=1.25, inference_capacity_factor=0.0)
    out = check_layer(moe, (tf.constant(x),), expected_shape=(2, 9, 16), atol=1e-5)
    route = moe.gate(tf.constant(x.reshape(18, 16)))
    ref = _experts_reference(moe, x.reshape(18, 16), route["indices"].numpy(),
                             route["weights"].numpy())
    np.testing.assert_allclose(out.numpy().reshape(18, 16), ref, rtol=1e-4, atol=1e-5)
    _, aux = moe(tf.constant(x), return_aux=True)
    assert float(aux["dropped"]) == 0.0 and float(tf.reduce_sum(aux["load"])) == 18 * 2


@pytest.mark.parametrize("int8", [False, True])
def test_few_tokens_gather_their_experts_and_equal_the_reference(int8, monkeypatch):
    """A decode-sized call (N * k * GATHER_PAIRS_PER_EXPERT <= E, dropless, inference)
    runs on each token's gathered expert weights (int8 stacks dequantized after the
    gather): the numpy reference's output and `dispatch_combine`'s load, eagerly, in a
    graph whose batch is unknown until it runs, and under XLA with the static decode's
    capacity. Past the threshold the same call dispatches."""
    from deepseek_tf.layers import moe as moe_module
    default = moe_module.GATHER_PAIRS_PER_EXPERT
    monkeypatch.setattr(moe_module, "GATHER_PAIRS_PER_EXPERT", 1)   # 3 x 2 x 1 <= 8
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 1, 16)).astype(np.float32)              # N = 3, k = 2, E = 8
    moe = _moe(inference_capacity_factor=0.0)
    moe(tf.constant(x))
    if int8:                                 # the keep-quantized layout, built by hand
        q = DeepSeekMoE(hidden_size=16, num_experts=8, top_k=2, moe_intermediate_size=8,
                        n_shared_experts=1, n_group=4, topk_group=2,
                        weight_quantization="int8")
        q(tf.constant(x))
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(moe, name).numpy()
            scale = 127 / np.abs(w).max(axis=1)                      # (E, out)
            getattr(q, name).assign(np.round(w * scale[:, None, :]).astype(np.int8))
            getattr(q, name + "_scale").assign(scale)
            getattr(moe, name).assign(np.round(w * scale[:, None, :]) / scale[:, None, :])
        for v, src in zip(q.gate.weights + q.shared_experts.weights,
                          moe.gate.weights + moe.shared_experts.weights):
            v.assign(src)
        layer = q
    else:
        layer = moe
    gathered = []
    real = DeepSeekMoE._gathered
    monkeypatch.setattr(DeepSeekMoE, "_gathered",
                        lambda self, *a: gathered.append(1) or real(self, *a))
    route = moe.gate(tf.constant(x.reshape(3, 16)))
    idx = route["indices"].numpy()
    ref = _experts_reference(moe, x.reshape(3, 16), idx, route["weights"].numpy())
    graph = tf.function(lambda v: layer(v, return_aux=True),
                        input_signature=[tf.TensorSpec([None, 1, 16])])
    xla = tf.function(lambda v: layer(v, capacity_factor=8 / 2), jit_compile=True)
    for y, aux in (layer(tf.constant(x), return_aux=True), graph(tf.constant(x)),
                   (xla(tf.constant(x)), None)):
        np.testing.assert_allclose(y.numpy().reshape(3, 16), ref, rtol=1e-4, atol=1e-5)
        if aux is not None:
            assert float(aux["dropped"]) == 0.0
            np.testing.assert_array_equal(aux["load"], np.bincount(idx.ravel(), minlength=8))
    assert len(gathered) == 3                   # eager, the graph's cond branch, XLA
    monkeypatch.setattr(moe_module, "GATHER_PAIRS_PER_EXPERT", default)
    if 3 * 2 * default > 8:                     # 3 tokens are too many at the default
        y = layer(tf.constant(x))
        np.testing.assert_allclose(y.numpy().reshape(3, 16), ref, rtol=1e-4, atol=1e-5)
        assert len(gathered) == 3


def test_small_capacity_drops_later_choices_first_and_counts_them():
    x = np.random.default_rng(2).normal(size=(1, 24, 16)).astype(np.float32)
    moe = _moe(capacity_factor=0.5)
    moe(tf.constant(x))
    y, aux = moe(tf.constant(x), training=True, return_aux=True)
    route = moe.gate(tf.constant(x[0]))
    idx, w = route["indices"].numpy(), route["weights"].numpy()
    cap = expert_capacity(24, 2, 8, 0.5)
    assert cap == 3
    keep, used = np.zeros_like(idx, bool), np.zeros(8, int)
    for j in range(2):              # every token's first choice before any second choice
        for n in range(24):
            if used[idx[n, j]] < cap:
                keep[n, j], used[idx[n, j]] = True, used[idx[n, j]] + 1
    assert float(aux["dropped"]) == (~keep).sum() > 0
    np.testing.assert_array_equal(aux["load"].numpy(), np.bincount(idx.ravel(), minlength=8))
    ref = _experts_reference(moe, x[0], idx, w, keep)
    np.testing.assert_allclose(y.numpy()[0], ref, rtol=1e-4, atol=1e-5)


def test_dispatch_compute_grows_with_top_k_not_experts():
    """The expert buffers hold capacity rows per expert: E * C ~ factor * N * k."""
    for e in (8, 64):
        c = expert_capacity(2048, 2, e, 1.25)
        assert e * c <= 1.25 * 2048 * 2 + e


def test_balance_loss_hand_computed():
    # Two tokens, four experts, top-2: token 1 picks {0, 1}, token 2 picks {1, 2}.
    scores = tf.constant([[[0.9, 0.8, 0.1, 0.2], [0.1, 0.7, 0.6, 0.2]]])
    idx = tf.constant([[[0, 1], [1, 2]]])
    # f = E/(kT) * counts = [1, 2, 1, 0]; P = mean of normalised scores
    #   = ([.45, .4, .05, .1] + [.0625, .4375, .375, .125]) / 2 = [.25625, .41875, .2125, .1125]
    # L = 1*.25625 + 2*.41875 + 1*.2125 = 1.30625
    assert float(sequence_balance_loss(scores, idx, 4)) == pytest.approx(1.30625, rel=1e-6)
    balanced = tf.fill((1, 4, 4), 0.5)
    assert float(sequence_balance_loss(balanced, tf.constant([[[0, 1], [2, 3], [0, 1], [2, 3]]]),
                                       4)) == pytest.approx(1.0)
    logits = tf.constant([[0.0, 0.0], [np.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 -> mean of squares
    assert float(router_z_loss(logits)) == pytest.approx((np.log(2) ** 2 + np.log(4) ** 2) / 2,
                                                         rel=1e-6)


def test_bias_update_moves_load_toward_balance():
    """A router skewed toward a few experts; the sign update alone rebalances the load."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 256, 16)).astype(np.float32)
    x[..., 0] = 3.0                                           # a constant feature
    x = tf.constant(x)
    moe = _moe(capacity_factor=0.0)
    moe(x)
    kernel = rng.normal(size=(16, 8)).astype(np.float32) * 0.5
    kernel[0] = 0.0
    kernel[0, :2] = 1.0                                       # experts 0 and 1 win everywhere
    moe.gate.kernel.assign(kernel)
    holder = types.SimpleNamespace(moe_layers=[moe])

    def imbalance():
        load = moe(x, training=True, return_aux=True)[1]["load"]
        return load, float(tf.reduce_max(load) / tf.reduce_mean(load))

    load, before = imbalance()
    for _ in range(150):
        update_router_biases(holder, tf.expand_dims(load, 0), speed=0.01)
        load, now = imbalance()
    assert before > 3.0 and now < 1.5, (before, now)
    bias = moe.gate.e_score_correction_bias.numpy()
    assert bias[:2].max() < bias[2:].min()      # the overloaded experts were pushed down


def test_moe_gradient_has_no_data_dependent_where():
    """concat's gradient of a gather builds tf.where(cond) with a data-dependent shape,
    which made XLA evaluate the whole train step at compile time (minutes)."""
    moe = _moe()
    x = tf.Variable(tf.ones((2, 8, 16)))
    moe(x)

    @tf.function
    def grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(moe(x, training=True) ** 2)
        return tape.gradient(loss, [x] + moe.trainable_variables)

    graph_ops = grads.get_concrete_function().graph.get_operations()
    assert "Where" not in {op.type for op in graph_ops}
    # the dispatch gathers' gradients are gathers too (`padded_gather`), not scatters
    # (the router's top-k gather keeps TensorFlow's: (N, k) scores, cheap)
    scatters = [op.name for op in graph_ops
                if op.type == "UnsortedSegmentSum" and "gradient" in op.name]
    assert len(scatters) == 1 and "/gate" in scatters[0], scatters


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_padded_gather_gradient_equals_the_gathers_scatter(dtype):
    """The inverse-map gradient of the token -> k slots gather (the k blocks summed)
    equals TensorFlow's own gather gradient bit for bit at top-2. The slot -> pair
    gather is checked with the whole dispatch against a dense reference below."""
    from deepseek_tf.layers.moe import padded_gather
    n, k, slots = 6, 2, 16
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(n, 3)), dtype)
    # slot of each (choice, token) pair, choice-major; 16 = dropped
    slot = tf.constant([0, 5, 9, 16, 2, 12, 3, 7, 16, 10, 1, 15], tf.int32)
    index_map = np.full(slots, n)
    index_map[[s for s in slot.numpy() if s < slots]] = [
        j % n for j, s in enumerate(slot.numpy()) if s < slots]
    index_map = tf.constant(index_map, tf.int32)
    g = tf.constant(rng.normal(size=(slots, 3)), dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = padded_gather(x, index_map, slot, k)
        theirs = tf.gather(tf.pad(x, [[0, 1], [0, 0]]), index_map)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_array_equal(tape.gradient(ours, x, output_gradients=g).numpy(),
                                  tape.gradient(theirs, x, output_gradients=g).numpy())


def test_dispatch_gradients_match_dense_einsum():
    rng = np.random.default_rng(4)
    x = tf.Variable(rng.normal(size=(10, 6)).astype(np.float32))
    idx = tf.constant(rng.integers(0, 4, size=(10, 2)).astype(np.int32))
    idx = tf.where(idx[:, :1] == idx[:, 1:], tf.stack([idx[:, 0], (idx[:, 0] + 1) % 4], 1), idx)
    w = tf.constant(rng.uniform(size=(10, 2)).astype(np.float32))
    gu = tf.Variable(rng.normal(size=(4, 6, 10)).astype(np.float32))
    dn = tf.Variable(rng.normal(size=(4, 5, 6)).astype(np.float32))

    def dense():
        h = tf.einsum("nd,edf->enf", x, gu)
        a = tf.nn.silu(h[..., :5]) * h[..., 5:]
        y = tf.einsum("enf,efd->end", a, dn)                          # (E, N, d)
        mask = tf.reduce_sum(tf.one_hot(idx, 4) * w[..., None], 1)    # (N, E)
        return tf.einsum("end,ne->nd", y, mask)

    for fn in (lambda: dispatch_combine(x, idx, w, gu, dn, None)[0], dense):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fn() ** 2)
        g = tape.gradient(loss, [x, gu, dn])
        if fn is dense:
            for a, b in zip(g, first):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
        first = g


def test_expert_parallel_layer_holds_its_share_and_needs_an_exchange():
    """`expert_parallel=2`: half the expert stacks, in the config; no call without the
    all-to-alls (tests/train/test_expert_parallel.py runs it on 2 workers)."""
    moe = DeepSeekMoE(hidden_size=8, num_experts=4, top_k=2, moe_intermediate_size=4,
                      expert_parallel=2)
    moe.build((None, None, 8))
    assert moe.gate_up_proj.shape == (2, 8, 8) and moe.down_proj.shape == (2, 4, 8)
    assert DeepSeekMoE.from_config(moe.get_config()).expert_parallel == 2
    with pytest.raises(ValueError, match="exchange"):
        moe(tf.ones((1, 3, 8)), training=True)
    with pytest.raises(ValueError, match="divides"):
        DeepSeekMoE(hidden_size=8, num_experts=4, top_k=2, moe_intermediate_size=4,
                    expert_parallel=3)
