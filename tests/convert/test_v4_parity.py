"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM, both ways.

The subprocess of test_hf_parity builds two tiny random V4 models (every attention
type, hash-routed and top-k MoE, sqrtsoftplus and sigmoid routers, swiglu_limit
active, legacy config keys in the second); we convert them and compare logits: on
T = 20 (compressed entries and a partial tail), on a left-padded batch, and on
T = 3 (below the window and every compress rate); greedy tokens of our KV-cache
decoding (eager and XLA), the SavedModel and the builtin-only TFLite model against
transformers' `generate` (its own cache); then we export to HF and
transformers reloads the export with no missing or unexpected tensor.
"""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.export import export, load_workdir
from deepseek_tf.generate import Generator
from tests.convert.test_hf_parity import (TOL, _torch, build_reference, check_greedy,
                                          check_hf_exports_reload, convert_references,
                                          left_padded_diff, quiet)

NAMES = ("deepseek_v4", "deepseek_v4_sigmoid")
PAD = 5  # hf_reference.PAD
PROMPTS = [[1, 17, 42, 99, 250, 7, 64, 12, 5, 80, 33], [3, 3, 140, 5, 288, 61, 12]]
NEW = 48  # longer than one HCA block (rate 8) many times over; 11 + 48 <= 64 positions
CONTEXT = 64


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """((HF dir, reference outputs), name -> (our workdir, our model))."""
    reference = build_reference(tmp_path_factory, NAMES)
    return reference, convert_references(reference[0], NAMES, tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_long_short_and_left_padded(v4, name):
    (_, ref), converted = v4
    model = converted[name][1]
    assert model.config.attention_type == "v4" and model.config.hc_mult > 1
    tokens = ref["tokens"]
    diff = float(np.abs(model(tf.constant(tokens, tf.int32)).numpy() - ref[name]).max())
    short = model(tf.constant(tokens[:, :3], tf.int32)).numpy()
    short_diff = float(np.abs(short - ref[f"{name}_short"]).max())
    # transformers compresses a left-padded row's windows from its first slot, padding
    # included, so that row differs from the same tokens alone; ours counts windows from
    # the first real token. So: row 0 padded equals row 0's real tokens alone, and the
    # other rows equal transformers' padded batch.
    expected = ref[f"{name}_padded"].copy()
    expected[0, PAD:] = model(tf.constant(tokens[:1, PAD:], tf.int32)).numpy()[0]
    pad_diff = left_padded_diff(model, tokens, expected, PAD)
    print(f"parity {name}: max-abs-diff {diff:.2e}, T=3 {short_diff:.2e}, "
          f"left-padded {pad_diff:.2e}")
    assert max(diff, short_diff, pad_diff) <= TOL, (diff, short_diff, pad_diff)


def test_hf_export_reloads_in_transformers(v4, tmp_path):
    check_hf_exports_reload(*v4, NAMES, "DeepseekV4ForCausalLM", tmp_path)


@pytest.fixture(scope="module")
def hf_generated(v4):
    """name -> transformers' greedy tokens for PROMPTS (one subprocess for both)."""
    (hf_dir, _), _ = v4
    for name in NAMES:
        np.save(hf_dir / name / "prompts.npy", np.array(PROMPTS, dtype=object),
                allow_pickle=True)
    _torch("generate", str(NEW), *(str(hf_dir / name) for name in NAMES))
    return {name: np.load(hf_dir / name / "generated.npy").tolist() for name in NAMES}


@pytest.mark.parametrize("name,xla", [(NAMES[0], False), (NAMES[1], False), (NAMES[0], True)])
def test_greedy_tokens_equal_transformers_generate(v4, hf_generated, name, xla):
    """48 new tokens past the window and many compressed entries of every rate (the
    cache pools entries from cached projections), one prompt at a time and the two as
    one left-padded batch (ours equals each prompt alone), eager and XLA."""
    _, converted = v4
    gen = Generator(converted[name][1], max_length=CONTEXT, jit_compile=xla)
    check_greedy(gen, PROMPTS, hf_generated[name], NEW)


def test_savedmodel_and_tflite_generate_transformers_tokens(v4, hf_generated, tmp_path):
    from deepseek_tf.export.tflite import op_names
    from deepseek_tf.generate.tflite_runner import TFLiteRunner
    _, converted = v4
    expected = hf_generated[NAMES[0]]
    wd, model = converted[NAMES[0]]
    _, exp = load_workdir(wd)
    sm = export(model, exp, "saved_model", str(tmp_path / "sm"), log=quiet, workdir=wd,
                max_length=CONTEXT, max_new_tokens=NEW)
    sig = tf.saved_model.load(sm).signatures["generate_ids"]
    ids = np.zeros((2, max(map(len, PROMPTS))), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, :len(p)] = p
    out = sig(input_ids=tf.constant(ids), lengths=tf.constant([len(p) for p in PROMPTS]),
              max_new_tokens=tf.constant([NEW] * 2), temperature=tf.constant([0.0] * 2),
              top_k=tf.constant([0] * 2), top_p=tf.constant([1.0] * 2),
              seed=tf.constant([0] * 2))
    assert out["output_ids"].numpy().tolist() == expected
    lite = export(model, exp, "tflite", str(tmp_path / "m.tflite"), log=quiet, workdir=wd,
                  max_length=CONTEXT, prefill_lengths=(4, 8))
    with open(lite, "rb") as f:
        ops = op_names(f.read())
    assert "TOPK_V2" in ops and not any("Flex" in o for o in ops), ops
    runner = TFLiteRunner(lite)
    for prompt, expect in zip(PROMPTS, expected):
        assert runner.generate(prompt, NEW) == expect
