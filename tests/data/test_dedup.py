"""Exact and near-duplicate removal: they remove what they should and nothing else."""

import numpy as np

from deepseek_tf.config import DataConfig
from deepseek_tf.data.dedup import ExactDedup, MinHasher, NearDedup, lsh_params, shingles
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.tokenizer import ByteTokenizer
from tests.helpers.corpora import read_split, write_jsonl


def _words(rng, n, vocab):
    return [vocab[i] for i in rng.integers(0, len(vocab), n)]


def _corpus():
    """12 unrelated documents, near copies of 3 of them, and 2 that share boilerplate."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = [_words(rng, 300, vocab) for _ in range(12)]
    docs = [" ".join(w) for w in base]
    near = []
    for i in (1, 4, 7):  # change 2 of 300 words: Jaccard of 5-gram shingles ~ 0.94
        w = list(base[i])
        w[50], w[200] = "changed", "edited"
        near.append(" ".join(w))
    boiler = _words(rng, 120, vocab)  # 120 shared words + 180 own: Jaccard ~ 0.25
    shared = [" ".join(boiler + _words(rng, 180, vocab)) for _ in range(2)]
    return docs, near, shared


def _jaccard(a, b):
    sa, sb = shingles(a, 5), shingles(b, 5)
    return len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))


def test_minhash_estimates_jaccard():
    docs, near, shared = _corpus()
    h = MinHasher(num_perm=128, ngram=5)
    for a, b in [(docs[1], near[0]), (shared[0], shared[1]), (docs[0], docs[2])]:
        est = np.mean(h.signature(a) == h.signature(b))
        assert abs(est - _jaccard(a, b)) < 0.12, (est, _jaccard(a, b))
    assert _jaccard(docs[1], near[0]) > 0.9 and 0.15 < _jaccard(*shared) < 0.4
    np.testing.assert_array_equal(h.signature(docs[3]), MinHasher(128, 5).signature(docs[3]))


def test_lsh_parameters_fit_the_threshold():
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        # The S-curve's midpoint (1/b)^(1/r) sits near the threshold.
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1


def test_near_dedup_removes_exactly_the_near_copies():
    docs, near, shared = _corpus()
    d = NearDedup(threshold=0.7)
    stream = docs + shared + near
    dropped = [i for i, t in enumerate(stream) if d.add(t)]
    assert dropped == [14, 15, 16]  # the three near copies, nothing else


def test_exact_dedup_keeps_first_occurrences():
    d = ExactDedup()
    assert [d.add(t) for t in ["a", "b", "a", "a ", "b"]] == [False, False, True, False, True]


def test_prepare_dedup_exact_and_near_with_workers(tmp_path):
    docs, near, shared = _corpus()
    stream = docs[:6] + [docs[2]] + near[:1] + shared + docs[6:] + near[1:] + [docs[0]]
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in stream])
    quiet = lambda *_: None  # noqa: E731
    common = dict(inputs=path, val_size=0, dedup_threshold=0.7)
    one = prepare(DataConfig(**common), str(tmp_path / "p1"), log=quiet)
    two = prepare(DataConfig(**common, num_proc=2), str(tmp_path / "p2"), log=quiet)
    assert one["report"]["removed"]["exact_duplicate"] == 2
    assert one["report"]["removed"]["near_duplicate"] == 3
    tok = ByteTokenizer()
    kept = [tok.decode(ids) for ids, _ in read_split(str(tmp_path / "p1"), one)]
    assert kept == docs[:6] + shared + docs[6:]
    # Worker processes give byte-identical shards.
    assert [s["sha256"] for s in one["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in two["splits"]["train"]["shards"]]
    assert one["report"]["near_dedup"]["bands"] * one["report"]["near_dedup"]["rows"] <= 128
