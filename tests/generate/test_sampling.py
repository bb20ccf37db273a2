"""The sampler against the exact distribution, and seeds: unseeded requests differ, a
seed reproduces."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.generate.decode import Generator
from deepseek_tf.generate.sampling import resolve_seeds, sample_tokens
from tests.helpers.tiny import nondeterministic
from tests.helpers.workdirs import random_model

LOGITS = np.array([2.0, 1.5, 1.0, 0.3, -0.5, -1.0], np.float32)
DRAWS = 3000


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _exact(temperature, top_k=0, top_p=1.0):
    """The distribution the options define: softmax(logits / T), top-k, then top-p."""
    p = _softmax(LOGITS / temperature)
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[:top_k or len(p)]] = True
    mass = np.cumsum(p[order]) - p[order]  # mass strictly above each token
    keep[order[(mass >= top_p * p[keep].sum())]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chisquare_pvalue(counts, probs):
    """Pearson's chi-square goodness-of-fit p-value of `counts` against `probs`: the
    chi2(k - 1) survival function is the regularized upper incomplete gamma Q(k/2 - 1/2, x/2)."""
    expected = probs / probs.sum() * counts.sum()
    x = float(((counts - expected) ** 2 / expected).sum())
    return float(tf.math.igammac((len(counts) - 1) / 2.0, x / 2.0))


@tf.function
def _draw(temperature, top_k, top_p):
    b = DRAWS
    logits = tf.tile(LOGITS[None], [b, 1])
    return sample_tokens(logits, tf.fill([b], temperature), tf.fill([b], top_k),
                         tf.fill([b], top_p), tf.range(b), 0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.3, 0, 0.8), (2.0, 4, 0.9)])
def test_frequencies_match_the_exact_distribution(temperature, top_k, top_p):
    counts = np.bincount(_draw(temperature, top_k, top_p).numpy(), minlength=len(LOGITS))
    expected = _exact(temperature, top_k, top_p)
    assert (counts[expected == 0] == 0).all()  # filtered tokens never come out
    kept = expected > 0
    assert _chisquare_pvalue(counts[kept], expected[kept]) > 1e-3, (counts, expected * DRAWS)
    # The test has power: the distribution at another temperature is rejected.
    wrong = _exact(1.0 if temperature != 1.0 else 0.5, top_k, top_p)
    if (wrong[kept] > 0).all() and not np.allclose(wrong, expected):
        assert _chisquare_pvalue(counts[kept], wrong[kept]) < 1e-6


def test_the_chisquare_pvalue_matches_known_values():
    # chi2 with 1 degree of freedom: P(X > 3.841) = 0.05; with 4: P(X > 9.488) = 0.05.
    assert _chisquare_pvalue(np.array([60.0, 40.0]), np.array([0.5, 0.5])) == \
        pytest.approx(0.0455, abs=1e-4)  # x = 4
    counts = np.array([30.0, 10, 20, 20, 20])
    assert _chisquare_pvalue(counts, np.ones(5)) == pytest.approx(0.0404, abs=1e-4)  # x = 10


def test_negative_seeds_are_drawn_and_others_kept():
    with nondeterministic():
        a, b = resolve_seeds([-1, 7, -5]).numpy(), resolve_seeds([-1, 7, -5]).numpy()
    assert a[1] == b[1] == 7 and (a >= 0).all()
    assert (a[[0, 2]] != b[[0, 2]]).any()


def test_unseeded_generation_differs_and_a_seed_reproduces():
    gen = Generator(random_model("gqa"), 40)
    ids, kw = [[256, 72, 105]], dict(max_new_tokens=24, temperature=1.0)
    with nondeterministic():  # as in generate and TF Serving (training turns it on)
        runs = [gen.generate(ids, [3], **kw)[0].numpy().tolist() for _ in range(2)]
    assert runs[0] != runs[1]
    seeded = [gen.generate(ids, [3], seed=11, **kw)[0].numpy().tolist() for _ in range(2)]
    assert seeded[0] == seeded[1]
