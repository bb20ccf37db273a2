"""DeepSeek-V3.2 (DSA) against transformers' DeepseekV32ForCausalLM.

The subprocess of test_hf_parity builds two tiny random V3.2 models (MoE with group
routing): index_topk=6 < T=20 (sparse attention matters) and index_topk=32 >= T
(dense). We convert them and compare logits (also of a left-padded batch), every
layer's indexer top-k sets, greedy tokens of transformers' `generate` against our
decode (absorbed and naive MLA, XLA on and off, SavedModel, TFLite) and the HF
export reloaded by transformers.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.export import export, load_workdir
from deepseek_tf.generate import Generator
from deepseek_tf.layers import attention_mask
from deepseek_tf.layers.indexer import select
from tests.convert.test_hf_parity import (TOL, _torch, build_reference, check_greedy,
                                          check_hf_exports_reload, convert_references,
                                          left_padded_diff, quiet)

NAMES = ("deepseek_v32", "deepseek_v32_dense")
PAD = 5  # hf_reference.PAD
PROMPTS = [[1, 17, 42, 99, 250, 7, 64, 12, 5, 80], [3, 3, 140, 5, 288, 61, 12]]
NEW = 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return build_reference(tmp_path_factory, NAMES)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    return convert_references(reference[0], NAMES, tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_also_left_padded(reference, converted, name):
    _, ref = reference
    model = converted[name][1]
    assert model.config.use_dsa and model.config.rope_interleave
    tokens = ref["tokens"]
    diff = float(np.abs(model(tf.constant(tokens, tf.int32)).numpy() - ref[name]).max())
    pad_diff = left_padded_diff(model, tokens, ref[f"{name}_padded"], PAD)
    print(f"parity {name}: max-abs-diff {diff:.2e}, left-padded {pad_diff:.2e}")
    assert diff <= TOL and pad_diff <= TOL, (diff, pad_diff)


def _our_topk(model, tokens):
    """(L, B, T, K) every layer's indexer picks, running the blocks one by one."""
    b, t = tokens.shape
    pos = tf.broadcast_to(tf.range(t), [b, t])
    mask = attention_mask(tf.ones([b, t], tf.int32))
    x, picks = model.embed_tokens(tf.constant(tokens, tf.int32)), []
    for block in model.blocks:
        attn, h = block.self_attn, block.input_layernorm(x)
        _, _, q_latent = attn._queries(h, pos)
        cos, sin = attn.rotary(pos)
        scores = attn.indexer.scores(h, q_latent, attn.indexer.keys(h, cos, sin), cos, sin,
                                     mask[:, 0])
        picks.append(select(scores, attn.index_topk).numpy())
        x = block(x, positions=pos, attention_mask=mask)
    return np.stack(picks)


@pytest.mark.parametrize("name", NAMES)
def test_indexer_topk_sets_equal_transformers(reference, converted, name):
    _, ref = reference
    ours, theirs = _our_topk(converted[name][1], ref["tokens"]), ref[f"{name}_topk"]
    assert ours.shape == theirs.shape
    layers, b, t, k = ours.shape
    for idx in np.ndindex(layers, b, t):
        allowed = set(range(idx[2] + 1))       # causal keys; the rest fill up to K
        assert set(ours[idx]) & allowed == set(theirs[idx]) & allowed, idx
    assert k < t if name == "deepseek_v32" else k == t


@pytest.fixture(scope="module")
def hf_tokens(reference):
    hf_dir, _ = reference
    np.save(hf_dir / NAMES[0] / "prompts.npy", np.array(PROMPTS, dtype=object),
            allow_pickle=True)
    _torch("generate", str(NEW), str(hf_dir / NAMES[0]))
    return np.load(hf_dir / NAMES[0] / "generated.npy").tolist()


@pytest.mark.parametrize("absorb,xla", [(True, False), (False, False), (True, True)])
def test_greedy_tokens_equal_transformers_generate(converted, hf_tokens, absorb, xla):
    """32 new tokens per prompt (positions beyond index_topk: sparse), one prompt at a
    time and the two as one left-padded batch."""
    gen = Generator(converted[NAMES[0]][1], max_length=48, absorb=absorb, jit_compile=xla)
    check_greedy(gen, PROMPTS, hf_tokens, NEW)


def test_savedmodel_and_tflite_generate_transformers_tokens(converted, hf_tokens, tmp_path):
    from deepseek_tf.export.tflite import op_names
    from deepseek_tf.generate.tflite_runner import TFLiteRunner
    wd, model = converted[NAMES[0]]
    _, exp = load_workdir(wd)
    sm = export(model, exp, "saved_model", str(tmp_path / "sm"), log=quiet, workdir=wd,
                max_length=48, max_new_tokens=NEW)
    sig = tf.saved_model.load(sm).signatures["generate_ids"]
    lite = export(model, exp, "tflite", str(tmp_path / "m.tflite"), log=quiet, workdir=wd,
                  max_length=48, prefill_lengths=(4, 8))
    with open(lite, "rb") as f:
        ops = op_names(f.read())
    assert "TOPK_V2" in ops and not any("Flex" in o for o in ops), ops
    runner = TFLiteRunner(lite)
    for prompt, expect in zip(PROMPTS, hf_tokens):
        out = sig(input_ids=tf.constant([prompt]), lengths=tf.constant([len(prompt)]),
                  max_new_tokens=tf.constant([NEW]), temperature=tf.constant([0.0]),
                  top_k=tf.constant([0]), top_p=tf.constant([1.0]), seed=tf.constant([0]))
        assert out["output_ids"].numpy()[0].tolist() == expect
        assert runner.generate(prompt, NEW) == expect


def test_hf_export_reloads_in_transformers(reference, converted, tmp_path):
    check_hf_exports_reload(reference, converted, NAMES, "DeepseekV32ForCausalLM", tmp_path)
    assert os.path.exists(tmp_path / NAMES[0] / "model.safetensors")
