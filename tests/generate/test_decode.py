"""The compiled decode loop and the samplers: greedy against step-by-step full
recomputation, top-k/top-p filtering against a numpy reference, seeds, stop
tokens, per-row options and batches of prompts of different lengths."""

import re

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.generate import Generator
from deepseek_tf.generate.sampling import NEG_INF, filter_logits
from tests.helpers.workdirs import random_model

PROMPTS = [[256, 10, 20, 30, 40, 50, 60], [256, 99], [256, 7, 8, 9, 10]]


def _pad(rows):
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, np.array([len(r) for r in rows], np.int32)


@pytest.fixture(scope="module")
def gqa():
    return random_model("gqa")


@pytest.fixture(scope="module")
def gen(gqa):
    return Generator(gqa, max_length=64, stop_ids=(), pad_id=258)


def _greedy_reference(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(model(tf.constant([seq])).numpy()[0, -1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", ["gqa", "mla_moe", "mla_dsa"])
def test_greedy_equals_full_recomputation_for_32_tokens(family):
    model = random_model(family)
    out, n = Generator(model, 48).generate(*_pad(PROMPTS[:1]), max_new_tokens=32)
    assert n.numpy().tolist() == [32]
    assert out.numpy()[0].tolist() == _greedy_reference(model, PROMPTS[0], 32)


@pytest.mark.parametrize("family", ["gqa", "hybrid_mla", "mla_moe"])
def test_xla_decode_steps_give_the_same_tokens(family):
    """XLA-compiled decode steps (static dropless MoE buffers) change nothing but speed,
    greedy and sampled, for a batch of mixed lengths."""
    model = random_model(family)
    ids, lengths = _pad(PROMPTS)
    kw = dict(max_new_tokens=[20, 12, 16], temperature=[0.0, 1.0, 0.7], seed=[1, 2, 3])
    plain, n = Generator(model, 48).generate(ids, lengths, **kw)
    xla, m = Generator(model, 48, jit_compile=True).generate(ids, lengths, **kw)
    np.testing.assert_array_equal(plain.numpy(), xla.numpy())
    np.testing.assert_array_equal(n.numpy(), m.numpy())


@pytest.mark.parametrize("family", ["gqa", "mla_moe", "mla_dsa", "v4"])
def test_xla_prefill_at_bucketed_widths_gives_the_same_tokens(family):
    """An XLA prefill left-pads the prompts to the next power of two from 16 (here 7 ->
    16: 9 more padding slots per row) and gives the uncompiled prefill's last logits and
    then the same tokens, greedy and sampled; when that width leaves too little room for
    the new tokens, the uncompiled prefill runs at the prompt's own width."""
    from deepseek_tf.generate.decode import bucketed_prefill, left_align, prefill_step

    model = random_model(family)
    ids, lengths = _pad(PROMPTS)
    aligned, pad = left_align(tf.constant(ids), tf.constant(lengths)), 7 - lengths
    want, _ = model.prefill(aligned, 48, pad)
    got, _, width, pad16 = bucketed_prefill(model, aligned, pad, 20, 48,
                                            prefill_fn=prefill_step(model, 48), up_to=64)
    assert int(width) == 16 and pad16.numpy().tolist() == (pad + 9).tolist()
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5)
    _, _, width, _ = bucketed_prefill(model, aligned, pad, 33, 48,     # 16 + 33 > 48
                                      prefill_fn=prefill_step(model, 48), up_to=64)
    assert int(width) == 7
    kw = dict(max_new_tokens=[20, 12, 16], temperature=[0.0, 1.0, 0.7], seed=[1, 2, 3])
    plain, n = Generator(model, 48).generate(ids, lengths, **kw)
    # Only the prefill compiled: the XLA decode loop has its own test above.
    xla, m = Generator(model, 48, prefill_jit=64).generate(ids, lengths, **kw)
    np.testing.assert_array_equal(plain.numpy(), xla.numpy())
    np.testing.assert_array_equal(n.numpy(), m.numpy())


def test_auto_times_the_prefill_and_keeps_what_it_measured(gqa, monkeypatch):
    """`pick_prefill` times the prefill of 128 tokens (the only probe a 200-token cache
    holds) with and without XLA and keeps the faster: XLA for every width if it won
    there, none otherwise. "Faster" is read from the measured times themselves, not from
    the log's ratio, which is rounded (a 0.998x tie prints as 1.00x)."""
    from deepseek_tf import autojit
    from deepseek_tf.generate.run import pick_prefill

    measured, choose = [], autojit.choose_xla
    monkeypatch.setattr(autojit, "choose_xla",
                        lambda times, *a, **kw: measured.append(times) or choose(times, *a, **kw))
    logs = []
    chosen = pick_prefill(Generator(gqa, 200, jit_compile=True), log=logs.append)
    found = re.match(r"prefill: prefill of 128 tokens [\d.]+ ms with XLA vs [\d.]+ ms "
                     r"without \(([\d.]+)x\)$", logs[0])
    assert found, logs
    assert len(measured) == 1, measured
    faster = measured[0]["no_xla"] / measured[0]["xla"] >= 1.0
    assert chosen == (200 if faster else 0), (chosen, logs)
    assert logs[1] == ("prefill: auto -> XLA for prompts of up to 199 tokens" if faster
                       else "prefill: auto -> no XLA"), logs


def test_batch_of_different_lengths_gives_each_prompt_its_own_result(gen):
    kw = dict(max_new_tokens=[12, 9, 12], temperature=[0.0, 0.9, 1.3], top_k=[0, 20, 0],
              top_p=[1.0, 1.0, 0.8], seed=[1, 2, 3])
    out, n = gen.generate(*_pad(PROMPTS), **kw)
    for i, prompt in enumerate(PROMPTS):
        one, m = gen.generate(*_pad([prompt]), **{k: [v[i]] for k, v in kw.items()})
        assert n.numpy()[i] == m.numpy()[0] == kw["max_new_tokens"][i]
        assert out.numpy()[i, :n[i]].tolist() == one.numpy()[0, :m[0]].tolist()
    assert (out.numpy()[1, 9:] == 258).all()  # rows that ended early are padded


def test_top_k_1_equals_greedy(gen):
    ids, lengths = _pad(PROMPTS)
    greedy, _ = gen.generate(ids, lengths, max_new_tokens=16)
    top1, _ = gen.generate(ids, lengths, max_new_tokens=16, temperature=1.5, top_k=1, seed=4)
    np.testing.assert_array_equal(greedy.numpy(), top1.numpy())


def test_seed_reproduces_and_other_seeds_differ(gen):
    ids, lengths = _pad(PROMPTS)
    kw = dict(max_new_tokens=24, temperature=1.0)
    a, _ = gen.generate(ids, lengths, seed=[5, 6, 7], **kw)
    b, _ = gen.generate(ids, lengths, seed=[5, 6, 7], **kw)
    c, _ = gen.generate(ids, lengths, seed=[8, 9, 10], **kw)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert (a.numpy() != c.numpy()).any()


def test_stop_token_ends_a_row_and_is_included(gqa):
    ids, lengths = _pad(PROMPTS[:1])
    free, _ = Generator(gqa, 64).generate(ids, lengths, max_new_tokens=20)
    stop = int(free.numpy()[0, 5])
    first = free.numpy()[0].tolist().index(stop)
    out, n = Generator(gqa, 64, stop_ids=(stop,), pad_id=258).generate(
        ids, lengths, max_new_tokens=20)
    assert n.numpy()[0] == first + 1
    assert out.numpy()[0].tolist() == free.numpy()[0, :first + 1].tolist()


def test_bad_requests_fail_with_a_clear_message(gen):
    ids, lengths = _pad(PROMPTS)
    cases = [(dict(max_new_tokens=100), "max_new_tokens too large"),
             (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
             (dict(top_p=1.5, temperature=1.0), "top_p must be > 0 and <= 1"),
             (dict(top_k=-1), "top_k must be >= 0")]
    for kw, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
            gen.generate(ids, lengths, **kw)
    with pytest.raises(tf.errors.InvalidArgumentError, match="lengths <= input_ids"):
        gen.generate(ids, lengths + 10)
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary size"):
        gen.generate(ids + 1000, lengths)


def _filter_reference(logits, k, p):
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(len(logits), bool)
    allowed = order[:k] if k else order
    probs = np.exp(logits[allowed] - logits[allowed].max())
    probs /= probs.sum()
    mass = 0.0
    for tok, pr in zip(allowed, probs):
        if mass >= p and keep.any():
            break
        keep[tok] = True
        mass += pr
    return keep


@pytest.mark.parametrize("k,p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.3), (50, 0.95)])
def test_filter_logits_matches_a_numpy_reference(k, p):
    logits = np.random.default_rng(k * 100 + int(p * 10)).normal(size=(3, 40)).astype(np.float32)
    got = filter_logits(tf.constant(logits), tf.fill([3], k), tf.fill([3], p)).numpy()
    for row in range(3):
        expect = _filter_reference(logits[row], k, p)
        np.testing.assert_array_equal(got[row] > NEG_INF, expect)


def test_multi_token_stop_ends_a_row_where_the_sequence_completes(gqa):
    from deepseek_tf.generate.decode import stop_suffix

    ids, lengths = _pad(PROMPTS[:2])
    free, _ = Generator(gqa, 64).generate(ids, lengths, max_new_tokens=20)
    seq = tuple(int(t) for t in free.numpy()[0, 4:7])  # 3 tokens row 0 writes at 4..6
    row = free.numpy()[0].tolist()
    end = next(i + 3 for i in range(18) if tuple(row[i:i + 3]) == seq)
    out, n = Generator(gqa, 64, stop_ids=(257, seq), pad_id=258).generate(
        ids, lengths, max_new_tokens=20)
    assert n.numpy()[0] == end and out.numpy()[0, :end].tolist() == row[:end]
    assert stop_suffix(out, n, (257, seq)).numpy()[0] == 3


@pytest.mark.parametrize("max_length", [2, 3, 4, 5])
def test_auto_jit_with_a_tiny_cache_generates(gqa, max_length):
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.generate.run import run_batches

    tok, logs = ByteTokenizer(), []
    prompts = [np.arange(1, max_length, dtype=np.int32), np.array([256], np.int32)]
    out = run_batches(gqa, tok, prompts, max_length, (257,), jit_compile="auto",
                      log=logs.append, max_new_tokens=1)
    assert [r["num_tokens"] for r in out] == [1, 1] and "jit_compile: auto ->" in logs[0]
