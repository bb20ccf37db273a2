"""TFLite export: tokens equal to the TensorFlow decode loop, builtin ops only,
prefill + decode equal to the Keras cached call, fp16 / int8, the interpreter
driven as LiteRT-LM drives it (padded prefill chunks)."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.export import export
from deepseek_tf.export.tflite import convert, op_names
from deepseek_tf.generate import Generator
from deepseek_tf.generate.tflite_runner import TFLiteRunner
from deepseek_tf.workdir import load_experiment
from tests.helpers.workdirs import make_workdir

CONTEXT = 64
FAMILIES = ("gqa", "hybrid", "mla", "mla_moe", "mla_dsa")
PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]  # BOS "The quick": 9 -> 8 + 1 padded
quiet = lambda *_: None  # noqa: E731
#: int8 (dynamic-range weights) against fp32 on these models: measured max |diff| of
#: logits ~0.05-0.1 (logit std ~2-3), top-1 agreement 100% over the test positions.
INT8_LOGIT_ATOL = 0.3
INT8_TOP1 = 0.9


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(family, quantize) -> (model, .tflite path); fp32 for every family, fp16 and
    int8 for gqa and mla_moe."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        workdir, model = make_workdir(str(root / "run"), family)
        exp = load_experiment(workdir)
        kinds = ("none", "fp16", "int8") if family in ("gqa", "mla_moe") else ("none",)
        for q in kinds:
            path = str(root / f"{family}_{q}.tflite")
            export(model, exp, "tflite", path, log=quiet, workdir=workdir, max_length=CONTEXT,
                   prefill_lengths=(4, 8), quantize=q)
            out[family, q] = (model, path)
    return out


def _keras_greedy(model, n=32):
    ids, count = Generator(model, CONTEXT, stop_ids=(), pad_id=258).generate(
        [PROMPT], [len(PROMPT)], max_new_tokens=n)
    return ids.numpy()[0, :int(count[0])].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_greedy_tokens_equal_the_decode_loop_over_32_steps(files, family):
    model, path = files[family, "none"]
    runner = TFLiteRunner(path)
    assert runner.context == CONTEXT and sorted(runner.prefill_runners) == [4, 8]
    assert runner.generate(PROMPT, max_new_tokens=32) == _keras_greedy(model)


def test_signatures_follow_the_litert_lm_contract(files):
    from ai_edge_litert.interpreter import Interpreter
    model, path = files["mla_moe", "none"]
    it = Interpreter(model_path=path)
    sigs = it.get_signature_list()
    caches = sorted(f"kv_cache_{kv}_{i}" for i in range(2) for kv in "kv")
    assert set(sigs) == {"decode", "prefill_4", "prefill_8"}
    assert sorted(sigs["decode"]["inputs"]) == sorted(caches + ["input_pos", "tokens"])
    assert sorted(sigs["decode"]["outputs"]) == sorted(caches + ["logits"])
    assert sorted(sigs["prefill_8"]["outputs"]) == caches
    dec = it.get_signature_runner("decode")
    shapes = {k: d["shape"].tolist() for k, d in dec.get_input_details().items()}
    cfg = model.config
    assert shapes["tokens"] == [1, 1] and shapes["input_pos"] == [1]
    # MLA: the latent and the rope key, context on axis 2.
    assert shapes["kv_cache_k_0"] == [1, 1, CONTEXT, cfg.kv_lora_rank]
    assert shapes["kv_cache_v_0"] == [1, 1, CONTEXT, cfg.qk_rope_head_dim]
    assert dec.get_output_details()["logits"]["shape"].tolist() == [1, 1, cfg.vocab_size]
    pre = it.get_signature_runner("prefill_8").get_input_details()
    assert pre["tokens"]["shape"].tolist() == [1, 8] and pre["input_pos"]["shape"].tolist() == [8]


def test_no_flex_op_in_any_exported_file(files):
    for (family, q), (_, path) in files.items():
        with open(path, "rb") as f:
            ops = set(op_names(f.read()))
        assert ops and not {o for o in ops if o.startswith("Flex") or o == "CUSTOM"}, (family, q)
        assert {"ONE_HOT", "SOFTMAX"} <= ops
    with open(files["mla_moe", "none"][1], "rb") as f:
        assert {"TOPK_V2", "CUMSUM"} & set(op_names(f.read()))  # MoE routing converted


@pytest.mark.parametrize("family", ("gqa", "mla_moe"))
def test_prefill_then_decode_equals_the_keras_cached_call(files, family):
    model, path = files[family, "none"]
    runner = TFLiteRunner(path)
    runner.prefill(PROMPT[:8])                      # one full prefill_8
    logits = runner.decode(PROMPT[8])
    cache = model.init_cache(1, CONTEXT)
    _, cache = model.call_cached(tf.constant([PROMPT[:8]]), cache, 0)
    want, cache = model.call_cached(tf.constant([[PROMPT[8]]]), cache, 8)
    np.testing.assert_allclose(logits, want.numpy()[0, -1], atol=1e-4, rtol=1e-4)
    # The caches agree too (k and v of every layer; MLA: latent and rope key).
    for i, (k, v) in enumerate(cache):
        np.testing.assert_allclose(runner.cache[f"kv_cache_k_{i}"][:, :, :9], k[:, :, :9],
                                   atol=1e-4)
        np.testing.assert_allclose(runner.cache[f"kv_cache_v_{i}"][:, :, :9], v[:, :, :9],
                                   atol=1e-4)


def test_padded_prefill_slots_do_not_corrupt_the_cache(files):
    """LiteRT-LM pads a short chunk with token 0 at input_pos 0: slot 0 must survive."""
    _, path = files["gqa", "none"]
    runner = TFLiteRunner(path)
    runner.prefill(PROMPT[:3])                      # prefill_4 with one padded entry
    first = {k: v.copy() for k, v in runner.cache.items()}
    runner.prefill(PROMPT[3:6])                     # padded again, later positions
    for k in first:
        np.testing.assert_array_equal(runner.cache[k][:, :, :3], first[k][:, :, :3])
    assert runner.pos == 6


def test_fp16_gives_the_same_tokens(files):
    model, path = files["gqa", "fp16"]
    assert TFLiteRunner(path).generate(PROMPT, max_new_tokens=32) == _keras_greedy(model)


@pytest.mark.parametrize("family", ("gqa", "mla_moe"))
def test_int8_stays_within_tolerance(files, family):
    fp32, int8 = TFLiteRunner(files[family, "none"][1]), TFLiteRunner(files[family, "int8"][1])
    tokens = _keras_greedy(files[family, "none"][0], 16)
    fp32.prefill(PROMPT[:-1])
    int8.prefill(PROMPT[:-1])
    diffs, agree = [], 0
    for token in [PROMPT[-1]] + tokens[:-1]:        # teacher-forced on the fp32 tokens
        a, b = fp32.decode(token), int8.decode(token)
        diffs.append(np.abs(a - b).max())
        agree += int(np.argmax(a) == np.argmax(b))
    assert max(diffs) < INT8_LOGIT_ATOL, max(diffs)
    assert agree / len(tokens) >= INT8_TOP1, agree


def test_file_sizes_shrink_with_quantization(files):
    import os
    size = {q: os.path.getsize(files["gqa", q][1]) for q in ("none", "fp16", "int8")}
    # The tiny model's many small tensors stay float (the converter quantizes weights of
    # >= 1024 elements), so the ratios are modest here; bench/edge.py measures a larger one.
    assert size["int8"] < size["fp16"] < 0.75 * size["none"], size


def test_sampling_with_a_seed_is_reproducible(files):
    runner = TFLiteRunner(files["gqa", "none"][1])
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    a = runner.generate(PROMPT, seed=3, **kw)
    assert a == runner.generate(PROMPT, seed=3, **kw) and len(a) == 12


def test_a_graph_that_needs_flex_is_refused(tmp_path):
    class NeedsFlex(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([4], tf.int32)])
        def f(self, x):
            return {"y": tf.strings.length(tf.strings.as_string(x))}

    m = NeedsFlex()
    tf.saved_model.save(m, str(tmp_path), signatures={"f": m.f})
    with pytest.raises(UserError, match="Flex.*tf.AsString"):
        convert(str(tmp_path), ["f"])


def test_bad_options_are_one_line_errors(files, tmp_path):
    model, _ = files["gqa", "none"]
    exp = type("E", (), {"model": model.config})()
    with pytest.raises(UserError, match="prefill lengths"):
        export(model, exp, "tflite", str(tmp_path / "x.tflite"), log=quiet, max_length=8,
               prefill_lengths=(16,))
    with pytest.raises(UserError, match="quantize"):
        export(model, exp, "tflite", str(tmp_path / "x.tflite"), log=quiet, quantize="gptq")
    with pytest.raises(UserError, match="int4 --group_size=48: TFLite int4 takes a group size "
                                        "of 32, 64, 128, 256, -1"):
        export(model, exp, "tflite", str(tmp_path / "x.tflite"), log=quiet, quantize="int4",
               group_size=48, max_length=16, prefill_lengths=(4,))
    with pytest.raises(UserError, match="group_size=64: LiteRT's quantizer refused: .*not "
                                        "divisible by block size 64.* or -1"):   # width 32
        export(model, exp, "tflite", str(tmp_path / "x.tflite"), log=quiet, quantize="int4",
               group_size=64, max_length=16, prefill_lengths=(4,))
