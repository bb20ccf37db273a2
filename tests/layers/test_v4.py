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

from deepseek_tf.layers.hyper import HyperConnection, HyperHead, sinkhorn
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


def _close(ours, theirs, tol=TOL):
    diff = float(np.abs(np.asarray(ours) - theirs).max())
    assert diff <= tol, diff


def test_hyper_connection_matches_transformers_and_comb_is_doubly_stochastic(ref):
    c = ref["hc"]
    streams = tf.constant(c["in"]["streams"])
    n, d = streams.shape[2], streams.shape[3]
    hc = HyperConnection(hidden_size=d, hc_mult=n, sinkhorn_iters=20)
    hc.build(streams.shape)
    hc.set_weights([c["w"]["fn"].T, c["w"]["base"], c["w"]["scale"]])
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


def test_hyper_head_matches_transformers(ref):
    c = ref["head"]
    streams = tf.constant(c["in"]["streams"])
    head = HyperHead(hidden_size=streams.shape[3], hc_mult=streams.shape[2])
    head.build(streams.shape)
    head.set_weights([c["w"]["hc_fn"].T, c["w"]["hc_base"], c["w"]["hc_scale"]])
    _close(head(streams), c["out"]["y"])
    check_layer(head, (streams,), expected_shape=c["out"]["y"].shape)
