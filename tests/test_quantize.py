"""4-bit weights with Keras' quantizers: the SavedModel's size, its log-probs against
float, saved_model_cli, GPTQ/AWQ against round-to-nearest, bad input."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.awq import last_errors
from deepseek_tf.data.shards import read_metadata
from deepseek_tf.errors import UserError
from deepseek_tf.export import export
from deepseek_tf.quantize import quantize_run, quantize_weights
from deepseek_tf.scoring import score_tokens
from deepseek_tf.workdir import load_experiment, load_run_tokenizer, load_workdir
from tests.export.test_saved_model import MAX_LENGTH, PROMPT, _saved_model_cli_run
from tests.helpers import tiny
from tests.helpers.corpora import read_split
from tests.helpers.quantized import dequantized
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731


def _variables_size(path):
    return os.path.getsize(os.path.join(path, "variables", "variables.data-00000-of-00001"))


def test_int4_saved_model_is_under_a_fifth_and_runs_in_saved_model_cli(tmp_path):
    """A dense model (every projection in int4 with group size 128, the untied embedding
    and head in int8, the default --quantize_head) whose MLP is 352 wide, as
    configs/tiny.flags' (`down_proj`'s last group holds 96 inputs): variables <= 0.2x
    float32; the SavedModel scores as the quantized model in memory; `saved_model_cli
    run` (a session loader, as TF Serving's) decodes. Its weights are random N(0, 0.2)
    (no outliers, large logits), so the log-prob tolerance is checked on a trained run
    below."""
    size = dict(hidden_size=128, intermediate_size=352)
    sizes = {}
    for mode in ("none", "int4"):
        workdir, model = make_workdir(str(tmp_path / f"run_{mode}"), "gqa", **size)
        path = str(tmp_path / mode)
        export(model, load_experiment(workdir), "saved_model", path, log=quiet,
               workdir=workdir, max_length=MAX_LENGTH, quantize=mode)
        sizes[mode] = _variables_size(path)
    assert sizes["int4"] <= 0.2 * sizes["none"], sizes
    assert model.blocks[0].mlp.down_proj.kernel_scale.shape == (3, 128)   # 128, 128, 96
    prompt = tf.constant([PROMPT])
    served = tf.saved_model.load(path).signatures["score"](
        input_ids=prompt, lengths=tf.constant([len(PROMPT)]))["log_probs"].numpy()
    np.testing.assert_allclose(served, score_tokens(model, prompt)[0].numpy(), atol=1e-4)
    run = _saved_model_cli_run(path, tmp_path, PROMPT[:3], 5)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "output_lengths" in run.stdout and "[5]" in run.stdout


def _validation_windows(data_dir, seq_len=32):
    """The validation split cut in windows of `seq_len` tokens, (N, seq_len) int32."""
    docs = np.concatenate([ids for ids, _ in read_split(data_dir, read_metadata(data_dir),
                                                         "validation")])
    n = docs.size // seq_len
    return tf.constant(docs[:n * seq_len].reshape(n, seq_len).astype(np.int32))


@pytest.fixture(scope="module")
def trained_dense_run(stdlib_data, tmp_path_factory):
    """A dense model (hidden 64) trained 200 steps on the stdlib corpus (~4 s): its
    weights have learnt structure for the calibration to find. Its workdir."""
    from deepseek_tf.train.loop import train
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, model=dict(hidden_size=64, intermediate_size=128),
                          train={"steps": 200, "log_every": 200, "eval_every": 0,
                                 "checkpoint_every": 200},
                          optim={"learning_rate": 5e-3, "warmup_steps": 0})
    path = str(tmp_path_factory.mktemp("trained-dense") / "run")
    train(exp, path, log=quiet)
    return path


def test_gptq_and_awq_beat_round_to_nearest_and_the_awq_saved_model_is_close(trained_dense_run,
                                                                          tmp_path):
    """Calibrated on the run's train split, scored on its validation split (group size
    32): GPTQ's and AWQ's validation loss is below plain int4 round-to-nearest's (the
    difference paired per window, over 3,331 windows of 32 tokens) and their next-token
    distributions stay closer to float's (mean KL); AWQ's projections that read one
    input (q/k/v, gate/up) share one set of scales, and its search lowered each block's
    output error on the calibration inputs below round-to-nearest's (alpha = 0) or kept
    it there. Measured here (head and embedding in int8, the default; AMD EPYC,
    2026-12-04): validation loss float 2.58799, int4 2.58894, GPTQ 2.58830 (-0.00064 +-
    0.00009 standard error against int4), AWQ 2.58790 (-0.00103 +- 0.00011); KL int4
    0.00028, GPTQ 0.00006, AWQ 0.00018 (each layer's own alpha chosen on its own output:
    0.00022; GPTQ with Keras 3.15's own error feedback, on another machine: 0.00019).
    With the packed calibration windows and AWQ's relative block error (Intel Xeon with
    AMX, 2026-12-05): loss float 2.58532, int4 2.58658, GPTQ 2.58527, AWQ 2.58471; KL
    int4 0.00043, GPTQ 0.00006, AWQ 0.00028. The AWQ SavedModel scores as the quantized model in memory, within 0.25 nats of float per
    token."""
    exp = load_experiment(trained_dense_run)
    ids = _validation_windows(exp.data.data_dir)
    kl, loss = {}, {}
    for mode in ("none", "int4", "gptq", "awq"):                # awq last: last_errors
        model, _ = load_workdir(trained_dense_run)
        if mode == "none":
            reference = model
        quantize_run(model, exp, load_run_tokenizer(trained_dense_run, exp), mode, 32,
                     calibration_samples=16, workdir=trained_dense_run)
        log_probs = tf.nn.log_softmax(model(ids))                 # (N, T, V)
        if mode == "none":
            float_log_probs = log_probs
        kl[mode] = float(tf.reduce_mean(tf.reduce_sum(
            tf.exp(float_log_probs) * (float_log_probs - log_probs), -1)))
        nll = -tf.gather(log_probs[:, :-1], ids[:, 1:], batch_dims=2)  # (N, T - 1)
        loss[mode] = tf.reduce_mean(nll, axis=1).numpy()               # per window
    print(kl, {m: float(v.mean()) for m, v in loss.items()})
    for mode in ("gptq", "awq"):
        paired = loss[mode] - loss["int4"]
        assert paired.mean() < 0, (mode, paired.mean(), paired.std() / paired.size ** 0.5)
    quantized = score_tokens(model, tf.constant([PROMPT]))[0].numpy()     # awq, in memory
    assert kl["int4"] > 0, kl
    assert kl["gptq"] < 0.5 * kl["int4"], kl
    assert kl["awq"] < 0.95 * kl["int4"], kl
    searched = {x.path for b in model.blocks for x in b._flatten_layers()
                if getattr(x, "quantization_mode", None) == "awq"}
    assert model.lm_head.quantization_mode == "int8" == model.embed_tokens.quantization_mode
    assert searched and set(last_errors) == searched, (searched, last_errors)
    for path, errors in last_errors.items():
        assert errors["block"] <= errors["block_rtn"], (path, errors)
        assert errors["clipped"] <= errors["scaled"], (path, errors)
    block = model.blocks[0]
    scales = {x.name: x.awq_scales.numpy() for x in block._flatten_layers()
              if getattr(x, "quantization_mode", None) == "awq"}
    for shared in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for name in shared[1:]:
            np.testing.assert_array_equal(scales[name], scales[shared[0]])
    assert not np.array_equal(scales["q_proj"], np.ones_like(scales["q_proj"]))
    path = str(tmp_path / "awq")
    export(model, exp, "saved_model", path, log=quiet, workdir=trained_dense_run,
           max_length=MAX_LENGTH, quantize="none")              # already quantized: awq
    prompt = tf.constant([PROMPT])
    served = tf.saved_model.load(path).signatures["score"](
        input_ids=prompt, lengths=tf.constant([len(PROMPT)]))["log_probs"].numpy()
    float_scores = score_tokens(reference, prompt)[0].numpy()
    np.testing.assert_allclose(served, quantized, atol=1e-4)      # the export is exact
    np.testing.assert_allclose(served, float_scores, atol=0.25)   # 4 bits: 0.16 measured
    assert not np.array_equal(served, float_scores)


def test_quantizing_the_default_run_calibrates_on_its_workdir_data(trained_dense_run,
                                                                   tmp_path):
    """A run trained on the embedded corpus names no --data.data_dir (its data is in
    WORKDIR/data): gptq finds it there; a run whose data is gone says so in one line."""
    exp = load_experiment(trained_dense_run)
    moved = dataclasses.replace(exp, data=exp.data.replace(data_dir=""))
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(exp.data.data_dir, os.path.join(workdir, "data"))
    model, _ = load_workdir(trained_dense_run)
    head, embedding = model.lm_head.kernel.numpy(), model.embed_tokens.embeddings.numpy()
    logged = []
    quantize_run(model, moved, load_run_tokenizer(trained_dense_run, exp), "gptq", 32,
                 calibration_samples=2, log=logged.append, workdir=workdir, head="none")
    assert logged == ["quantized weights: gptq, group size 32, calibrated on 2 windows of "
                      f"{exp.data.seq_len} tokens"]
    modes = {x.quantization_mode for b in model.blocks for x in b._flatten_layers()
             if hasattr(x, "kernel")}
    assert modes == {"gptq"}, modes               # --quantize_head=none: outside stays float
    assert getattr(model.lm_head, "quantization_mode", None) is None
    assert getattr(model.embed_tokens, "quantization_mode", None) is None
    np.testing.assert_array_equal(model.lm_head.kernel.numpy(), head)
    np.testing.assert_array_equal(model.embed_tokens.embeddings.numpy(), embedding)
    with pytest.raises(UserError, match=r"found no prepared data of the run \(none at "):
        quantize_run(model, moved, None, "awq", 32, workdir=str(tmp_path / "gone"))


def test_bad_group_size_and_missing_calibration_data_are_refused(tmp_path):
    workdir, model = make_workdir(str(tmp_path / "run"), "gqa")     # hidden 32, no data
    exp, tok = load_experiment(workdir), load_run_tokenizer(workdir, load_experiment(workdir))
    with pytest.raises(UserError, match="--quantize_head='fp8': one of none, int8, int4"):
        quantize_run(model, exp, tok, "int4", 16, head="fp8")
    wide, wide_model = make_workdir(str(tmp_path / "wide"), "gqa", intermediate_size=160)
    with pytest.raises(UserError, match="--group_size=-1: Keras' GPTQ makes one scale per "
                                        "128 inputs, not per channel, and layer .*down_proj "
                                        "has 160"):
        quantize_run(wide_model, load_experiment(wide), tok, "gptq", -1)
    with pytest.raises(UserError, match="--quantize=gptq needs calibration data"):
        quantize_run(model, dataclasses.replace(exp, data=exp.data.replace(data_dir="")), tok,
                     "gptq", 16)
    with pytest.raises(UserError, match="--calibration_data=.*no such file"):
        quantize_run(model, exp, tok, "awq", 16, calibration_data=str(tmp_path / "nope"))
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    with pytest.raises(UserError, match="fewer than one window"):
        quantize_run(model, exp, tok, "awq", 16, calibration_data=str(short))


def test_instruction_records_calibrate_as_the_fine_tuning_saw_them(tmp_path):
    """A JSONL calibration file of alpaca / sharegpt / prompt records: each window holds
    the record rendered by the chat template, as `prepare` renders SFT samples (the
    alpaca `input` included, the template's markers around it), not its fields' text
    joined; a record of no known kind, or not an object, is one clear error."""
    from deepseek_tf.data import sft
    from deepseek_tf.data.templates import TEMPLATES
    from deepseek_tf.data.tokenizer import ByteTokenizer
    from deepseek_tf.calibration import calibration_windows
    tok = ByteTokenizer()
    alpaca = {"instruction": "Add the numbers.", "input": "18 + 2", "output": "20"}
    chat = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in
                              [alpaca, chat, {"prompt": "Say a", "output": "a"}]) + "\n")
    template = TEMPLATES["chatml"]
    expected = np.concatenate([
        sft.encode(sft.parse_record(alpaca, "alpaca"), template, tok, 1 << 30)[0],
        sft.encode(sft.parse_record(chat, "sharegpt"), template, tok, 1 << 30)[0],
        sft.encode(sft.Conversation("", "", (("user", "Say a"), ("assistant", "a"))),
                   template, tok, 1 << 30)[0]])
    windows = calibration_windows(str(path), tok, 8, 1000, "chatml")
    n = (len(expected) - 1) // 8  # training's windows: 8 tokens and the next one's target
    np.testing.assert_array_equal(windows.tokens, expected[:n * 8].reshape(n, 8))
    text = tok.decode(windows.tokens.reshape(-1).tolist())
    assert "Add the numbers.\n18 + 2" in text and "<|im_start|>assistant" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(alpaca) + "\n" + json.dumps({"question": "?"}) + "\n")
    # Packed as training packs: a record starts a new segment at position 0; a window
    # starts one too (the rest of a record cut there counts from 0).
    starts = set(np.cumsum([0] + [len(sft.encode(c, template, tok, 1 << 30)[0]) for c in (
        sft.parse_record(alpaca, "alpaca"), sft.parse_record(chat, "sharegpt"))]))
    for i in range(n):
        assert windows.segment_ids[i, 0] == 1 and windows.positions[i, 0] == 0
        for j in range(1, 8):
            new_doc = i * 8 + j in starts
            assert windows.segment_ids[i, j] == windows.segment_ids[i, j - 1] + new_doc
            assert windows.positions[i, j] == (0 if new_doc else windows.positions[i, j - 1] + 1)
    with pytest.raises(UserError, match="record 2: no text, instruction, prompt or "
                                        "conversations field"):
        calibration_windows(str(bad), tok, 8, 10, "chatml")
    bad.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        calibration_windows(str(bad), tok, 8, 10, "chatml")


@pytest.mark.parametrize("family", ["gqa", "mla_moe"])
def test_the_calibration_walk_sees_each_document_alone_as_the_model_does(tmp_path, family):
    """The layers Keras' GPTQ/AWQ walk calls (embedding, then each block on the previous
    one's output) give, on a window of several documents, the model's own hidden states
    for those documents packed with their segment ids and positions: a document attends
    only to itself, from position 0, as in training and generation."""
    from deepseek_tf.calibration import Windows
    from deepseek_tf.quantize import _calibration_layers
    workdir, _ = make_workdir(str(tmp_path / "run"), family)
    model, _ = load_workdir(workdir)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 24)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 11 + [3] * 8, [1] * 24], np.int32)
    positions = np.array([list(range(5)) + list(range(11)) + list(range(8)),
                          list(range(3, 27))], np.int32)
    embedding, blocks = _calibration_layers(model)
    outputs = []
    for i in range(2):
        x = embedding(tf.constant(np.stack(Windows(tokens, segments, positions), 1)[i]))
        for block in blocks:
            x = block(x)                                              # (1, T, D + 2)
        np.testing.assert_array_equal(x[0, :, -2:], np.stack([segments[i], positions[i]], -1))
        outputs.append(model.head(model.norm(x[..., :-2])))
    for i in range(2):                      # one window a call, as the walk (MoE capacity)
        expected = model(tokens[i:i + 1], segment_ids=segments[i:i + 1],
                         positions=positions[i:i + 1])
        np.testing.assert_allclose(outputs[i], expected, atol=1e-4, rtol=1e-4)
    alone = model(tokens[:1, 5:16], positions=positions[:1, 5:16])   # document 2 by itself
    np.testing.assert_allclose(outputs[0][:, 5:16], alone, atol=1e-4, rtol=1e-4)


def test_a_group_size_that_does_not_divide_the_widths_quantizes_like_numpy(tmp_path):
    """Group size 32 on a model 48 wide with an MLP of 80 (every projection's last group
    is narrower: 16 inputs): int4, gptq and awq make ceil(width / 32) groups, each of 32
    inputs but one of width % 32, and every projection's output is x times the kernel
    rebuilt in numpy from its stored 4-bit values, group scales and zero points.
    Round-to-nearest is within half a group scale of the float weight (int4 on W, awq on
    W diag(s)); gptq moves weights to compensate errors, so it is not. gptq and awq
    calibrate on exactly the windows given, in order. (The export of a narrower last
    group: the saved_model_cli test above.)"""
    workdir, _ = make_workdir(str(tmp_path / "run"), "gqa", hidden_size=48,
                              intermediate_size=80, num_hidden_layers=1)
    tok = load_run_tokenizer(workdir, load_experiment(workdir))
    windows = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
    x = np.random.default_rng(1).normal(size=(3, 80)).astype(np.float32)
    for mode in ("int4", "gptq", "awq"):
        model, _ = load_workdir(workdir)
        floats = {layer.path: layer.kernel.numpy() for b in model.blocks
                  for layer in b._flatten_layers() if isinstance(layer, keras.layers.Dense)}
        embedded = []                  # what Keras' calibration walk embeds: the windows
        object.__setattr__(model.embed_tokens, "call", lambda ids, _call=model.embed_tokens.call:
                           embedded.append(np.asarray(ids)) or _call(ids))
        quantize_weights(model, mode, 32, windows, tok, head="none")
        object.__delattr__(model.embed_tokens, "call")
        if mode != "int4":
            np.testing.assert_array_equal(np.concatenate(embedded), windows)
        for b in model.blocks:
            for layer in b._flatten_layers():
                if not isinstance(layer, keras.layers.Dense):
                    continue
                assert layer.quantization_mode == mode, layer.path
                w, scale = dequantized(layer)
                width = w.shape[0]
                groups = np.bincount(layer.g_idx.numpy().astype(np.int64))
                assert sorted(groups) == sorted([32] * (width // 32) + [width % 32]), groups
                got = layer(tf.constant(x[:, :width])).numpy()
                np.testing.assert_allclose(got, x[:, :width] @ w, atol=1e-5, err_msg=layer.path)
                if mode == "int4":
                    assert np.all(np.abs(w - floats[layer.path]) <= 0.5001 * scale)
                elif mode == "awq":
                    s = layer.awq_scales.numpy()[:, None]
                    assert np.all(np.abs(w - floats[layer.path]) * s <= 0.5001 * scale)


def _weight_types(path):
    """{(op name, weight tensor type)} of the ops with a constant (buffered) input."""
    from tensorflow.lite.python import schema_py_generated as schema
    with open(path, "rb") as f:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(f.read()), 0))
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = set()
    for graph in model.subgraphs:
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = ops[max(code.builtinCode, code.deprecatedBuiltinCode)]
            for i in op.inputs:
                if i >= 0 and types[graph.tensors[i].type] in ("INT4", "INT8"):
                    out.add((name, types[graph.tensors[i].type]))
    return out


def test_tflite_int4_runs_in_litert_and_the_litert_lm_engine(trained_dense_run, tmp_path):
    """`--format=tflite|litertlm --quantize=int4` (LiteRT's quantizer, group size 32):
    the projections' FULLY_CONNECTED weights are int4, the file shrinks, the next-token
    choice agrees with the float file's on most validation tokens (teacher-forced), and
    Google's LiteRT-LM engine generates the same greedy tokens from the int4 bundle as
    the interpreter does from the int4 file."""
    litert_lm = pytest.importorskip("litert_lm", reason="pip install 'deepseek_tf[edge]'")
    from deepseek_tf.generate.tflite_runner import TFLiteRunner
    model, exp = load_workdir(trained_dense_run)
    paths = {}
    for fmt, q in (("tflite", "none"), ("tflite", "int4"), ("litertlm", "int4")):
        paths[fmt, q] = export(model, exp, fmt, str(tmp_path / f"{q}.{fmt}"), log=quiet,
                               workdir=trained_dense_run, max_length=MAX_LENGTH,
                               prefill_lengths=(8,), quantize=q, group_size=32)
    float_path, int4_path = paths["tflite", "none"], paths["tflite", "int4"]
    assert _weight_types(int4_path) == {("FULLY_CONNECTED", "INT4")}
    ratio = os.path.getsize(int4_path) / os.path.getsize(float_path)
    text = _validation_windows(exp.data.data_dir, MAX_LENGTH - 8).numpy()[0].tolist()
    runners = TFLiteRunner(float_path), TFLiteRunner(int4_path)
    logits = []
    for runner in runners:
        runner.prefill(text[:8])
        logits.append(np.stack([runner.decode(t) for t in text[8:]]))  # (N, V)
    agree = float(np.mean(np.argmax(logits[0], -1) == np.argmax(logits[1], -1)))
    print(f"int4/float size {ratio:.3f}, top-1 agreement {agree:.3f}")
    assert ratio < 0.4 and agree > 0.85, (ratio, agree)
    engine = litert_lm.Engine(paths["litertlm", "int4"], backend=litert_lm.Backend.CPU(),
                              max_num_tokens=MAX_LENGTH,
                              activation_data_type=litert_lm.ActivationDataType.FLOAT32)
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=16)
    session.run_prefill(["The quick brown fox"])   # the engine adds BOS
    tokenizers = pytest.importorskip("tokenizers")
    from deepseek_tf.export.litertlm import byte_tokenizer_json
    tok = load_run_tokenizer(trained_dense_run, exp)
    ids = tok.encode("The quick brown fox", add_bos=True, add_eos=False).tolist()
    want = runners[1].generate(ids, max_new_tokens=16, stop_ids=(257,))
    shown = want[:-1] if want[-1] == 257 else want    # the engine does not print a stop
    spell = tokenizers.Tokenizer.from_str(byte_tokenizer_json(tok))
    assert session.run_decode().texts[0] == spell.decode(shown, skip_special_tokens=False)


def test_a_lora_model_is_merged_before_it_is_quantized(trained_dense_run):
    """generate/evaluate --quantize on a LoRA run quantize W + (alpha / r) A B, as the
    export (which merges first) does: same log-probs as quantizing the merged model."""
    from deepseek_tf.config import LoraConfig
    from deepseek_tf.lora import apply_lora, is_lora, merged_model
    exp = load_experiment(trained_dense_run)
    tok = load_run_tokenizer(trained_dense_run, exp)
    model, _ = load_workdir(trained_dense_run)
    apply_lora(model, LoraConfig(rank=4, targets="all"))
    rng = np.random.default_rng(0)
    for v in model.variables:
        if "lora_kernel_b" in v.path:       # B starts at zero: give the adapters an effect
            v.assign(rng.normal(0, 0.05, v.shape).astype(np.float32))
    ids = tf.constant([PROMPT])
    want = score_tokens(quantize_run(merged_model(model), exp, tok, "int4", 32), ids)[0]
    quantized = quantize_run(model, exp, tok, "int4", 32)
    assert not is_lora(quantized)
    np.testing.assert_allclose(score_tokens(quantized, ids)[0], want, atol=1e-5)
    assert not np.allclose(score_tokens(load_workdir(trained_dense_run)[0], ids)[0], want,
                           atol=1e-2)                       # the adapters did count
