"""DeepSeek-V4 leaf layers against transformers' modules (tiny random weights).

One subprocess (tests/layers/v4_reference.py: torch + transformers) dumps each
module's weights, inputs and outputs; each test loads the weights into our layer,
runs it on the same inputs and compares (float32, <= 1e-5), then checks the layer
with `check_layer` (get_config round trip, gradients).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.v4 import V4_LAYER_TYPES
from deepseek_tf.convert.weights import hyper_entries, v4_attention_entries, v4_moe_entries
from deepseek_tf.layers import attention_mask
from deepseek_tf.layers.hyper import HyperConnection, HyperHead, sinkhorn
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.layers.v4_attention import V4Attention
from tests.convert.test_hf_parity import _env
from tests.helpers.layer_checks import check_layer

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v4_reference.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("v4") / "ref.npz"
    proc = subprocess.run([sys.executable, REFERENCE, str(out)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = dict(np.load(out))
    cases = {}
    for key, value in data.items():
        case, group, name = key.split("/", 2)
        cases.setdefault(case, {}).setdefault(group, {})[name] = value
    return cases


def load_entries(entries, hf: dict):
    """Fills every entry's variable slice from HF tensors `hf` (all must be used)."""
    assert {e.name for e in entries} == set(hf), {e.name for e in entries} ^ set(hf)
    for e in entries:
        value = e.variable.numpy()
        value[e.index] = hf[e.name].T if e.transpose else hf[e.name]
        e.variable.assign(value)


def _close(ours, theirs, tol=TOL):
    diff = float(np.abs(np.asarray(ours) - theirs).max())
    assert diff <= tol, diff


def test_hyper_connection_matches_transformers_and_comb_is_doubly_stochastic(ref):
    c = ref["hc"]
    streams = tf.constant(c["in"]["streams"])
    n, d = streams.shape[2], streams.shape[3]
    hc = HyperConnection(hidden_size=d, hc_mult=n, sinkhorn_iters=20)
    hc.build(streams.shape)
    load_entries(hyper_entries("hc", hc), {f"hc_{k}": v for k, v in c["w"].items()})
    post, comb, collapsed = hc(streams)
    for name, ours in (("post", post), ("comb", comb), ("collapsed", collapsed)):
        _close(ours, c["out"][name])
    _close(tf.reduce_sum(comb, -1), 1.0)
    _close(tf.reduce_sum(comb, -2), 1.0)
    check_layer(hc, (streams,), expected_shape=streams.shape[:2] + (n,))


def test_sinkhorn_of_row_softmaxed_logits_is_doubly_stochastic():
    m = tf.nn.softmax(tf.random.stateless_normal((64, 4, 4), seed=(1, 2)), -1) + 1e-6
    s = sinkhorn(m, iters=20, eps=1e-6)
    _close(tf.reduce_sum(s, -1), 1.0)
    _close(tf.reduce_sum(s, -2), 1.0)


def test_sinkhorn_graph_does_not_grow_with_its_iterations():
    """The passes are one while loop: tracing 20 of them gives the graph of 3 (XLA
    compile time of V4 models halved), and the loop equals the passes written out."""
    m = tf.nn.softmax(tf.random.stateless_normal((8, 4, 4), seed=(3, 4)), -1) + 1e-6

    def ops(iters):
        fn = tf.function(lambda x: sinkhorn(x, iters, 1e-6), autograph=False)
        return len(fn.get_concrete_function(m).graph.get_operations())

    assert ops(20) == ops(3)
    unrolled = m / (tf.reduce_sum(m, -2, keepdims=True) + 1e-6)
    for _ in range(19):
        unrolled = unrolled / (tf.reduce_sum(unrolled, -1, keepdims=True) + 1e-6)
        unrolled = unrolled / (tf.reduce_sum(unrolled, -2, keepdims=True) + 1e-6)
    np.testing.assert_array_equal(tf.function(lambda x: sinkhorn(x, 20, 1e-6))(m), unrolled)


def test_hyper_head_matches_transformers(ref):
    c = ref["head"]
    streams = tf.constant(c["in"]["streams"])
    head = HyperHead(hidden_size=streams.shape[3], hc_mult=streams.shape[2])
    head.build(streams.shape)
    load_entries(hyper_entries("h", head, head=True), {f"h.{k}": v for k, v in c["w"].items()})
    _close(head(streams), c["out"]["y"])
    check_layer(head, (streams,), expected_shape=c["out"]["y"].shape)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
@pytest.mark.parametrize("kind", ["hash", "topk"])
def test_moe_matches_transformers_with_swiglu_limit(ref, scoring, kind):
    """Hash routing (experts = tid2eid[input_ids]) and learned top-k routing with the
    correction bias; swiglu_limit 0.3 clips most pre-activations."""
    c = ref[f"moe_{scoring}_{kind}"]
    w, x, ids = c["w"], tf.constant(c["in"]["x"]), tf.constant(c["in"]["input_ids"], tf.int32)
    e, d = w["gate.weight"].shape
    f = w["experts.0.w1.weight"].shape[0]
    moe = DeepSeekMoE(hidden_size=d, num_experts=e, top_k=2, moe_intermediate_size=f,
                      n_shared_experts=1, scoring_func=scoring,
                      topk_method="hash" if kind == "hash" else "noaux_tc",
                      routed_scaling_factor=1.5, inference_capacity_factor=0.0,
                      swiglu_limit=0.3, vocab_size=64)
    moe.build(x.shape)
    load_entries(v4_moe_entries("m", moe), {f"m.{k}": v for k, v in w.items()})
    _close(moe(x, input_ids=ids), c["out"]["y"])
    if kind == "hash":
        route = moe.gate(tf.reshape(x, [-1, d]), tf.reshape(ids, [-1]))
        np.testing.assert_array_equal(route["indices"].numpy(),
                                      w["gate.tid2eid"][c["in"]["input_ids"].reshape(-1)])
    check_layer(moe, (x,), {"input_ids": ids}, expected_shape=x.shape)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layer_type", list(V4_LAYER_TYPES))
def test_attention_matches_transformers(ref, layer_type, padded):
    """T = 19: 4 complete CSA entries and 2 HCA entries (of 4 and 8 tokens) plus a
    partial tail, window 6; CSA's indexer keeps 2 entries per query. Padded: row 0
    left-padded by 3 with positions counting from its first token (compressed layers:
    equal to the row alone, see below)."""
    c = ref[f"attn_{layer_type}{'_padded' if padded else ''}"]
    x, pos = tf.constant(c["in"]["x"]), tf.constant(c["in"]["positions"], tf.int32)
    keep = c["in"]["keep"]
    compressed = layer_type != "sliding_attention"
    attn = V4Attention(
        hidden_size=32, num_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=24,
        o_groups=2, o_lora_rank=8, sliding_window=6, layer_type=layer_type,
        compress_rate={"sliding_attention": 0, "compressed_sparse_attention": 4,
                       "heavily_compressed_attention": 8}[layer_type],
        rope_theta=160000.0 if compressed else 10000.0, index_n_heads=8, index_head_dim=12,
        index_topk=2)
    mask = attention_mask(tf.constant(keep, tf.int32))
    attn(x, pos, mask)
    load_entries(v4_attention_entries("a", attn), {f"a.{k}": v for k, v in c["w"].items()})
    ours = attn(x, pos, mask).numpy()
    if padded and compressed:
        # transformers compresses windows from the row's first slot, padding included,
        # so its left-padded row differs from the same tokens alone; ours counts
        # windows from the first real token: row 0 equals itself unpadded.
        pad = int((~keep[0]).sum())
        alone = attn(x[:1, pad:], pos[:1, pad:], attention_mask(tf.constant(keep[:1, pad:],
                                                                             tf.int32)))
        _close(ours[0, pad:], alone.numpy()[0])
        _close(ours[1:], c["out"]["y"][1:])
    else:
        _close(ours[keep], c["out"]["y"][keep])
    if not padded:
        # The indexer picks entries (top-k): only its own KL loss trains it.
        check_layer(attn, (x, pos, mask), expected_shape=x.shape,
                    no_gradient=("indexer", "index_compressor"))


@pytest.mark.parametrize("layer_type", ["compressed_sparse_attention",
                                        "heavily_compressed_attention"])
def test_packed_documents_compress_as_if_alone(layer_type):
    """A packed row [doc A (9 tokens), doc B (14)] with positions restarting at B: each
    document's outputs equal the layer run on that document alone (B's compressed
    entries count windows from its own first token and never pool or read A's)."""
    tf.keras.utils.set_random_seed(7)
    attn = V4Attention(hidden_size=32, num_heads=4, head_dim=16, rope_head_dim=8,
                       q_lora_rank=24, o_groups=2, o_lora_rank=8, sliding_window=6,
                       layer_type=layer_type,
                       compress_rate=4 if layer_type == "compressed_sparse_attention" else 8,
                       index_n_heads=8, index_head_dim=12, index_topk=2)
    x = tf.random.stateless_normal((1, 23, 32), seed=[1, 7])
    seg = tf.constant([[1] * 9 + [2] * 14], tf.int32)
    pos = tf.constant([list(range(9)) + list(range(14))], tf.int32)
    packed = attn(x, pos, attention_mask(seg)).numpy()
    for lo, hi in ((0, 9), (9, 23)):
        n = hi - lo
        alone = attn(x[:, lo:hi], tf.range(n)[None], attention_mask(tf.ones((1, n), tf.int32)))
        np.testing.assert_allclose(packed[:, lo:hi], alone.numpy(), atol=1e-5)
