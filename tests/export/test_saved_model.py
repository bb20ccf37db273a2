"""The TF Serving SavedModel: signatures, tokens equal to Keras, bad requests.

`tensorflow_model_server` cannot be installed here (no docker registry; it is on
neither PyPI nor Debian). So these tests check everything up to it: the
signatures as `saved_model_cli` shows and runs them, the graphs against the Keras
model, and `serving/client.py` over REST and gRPC against in-process servers that
follow TF Serving's predict API (tests/helpers/tf_serving.py) serving the export.
`serving/smoke_test.sh` checks the real server where docker exists.
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.export import export
from deepseek_tf.generate import Generator
from tests.helpers import tf_serving
from tests.helpers.tiny import nondeterministic
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("serving_client",
                                               os.path.join(ROOT, "serving", "client.py"))
client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client)

MAX_LENGTH = 64
FAMILIES = ("gqa", "hybrid", "mla", "mla_moe")
PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]  # BOS "The quick"
quiet = lambda *_: None  # noqa: E731


def _options(b, n=32, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    return dict(max_new_tokens=tf.fill([b], n), temperature=tf.fill([b], float(temperature)),
                top_k=tf.fill([b], top_k), top_p=tf.fill([b], float(top_p)),
                seed=tf.fill([b], seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model, SavedModel dir laid out as MODEL_BASE/NAME/1)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        workdir, model = make_workdir(str(root / "run"), family)
        path = str(root / "models" / "deepseek" / "1")
        with nondeterministic():  # as a fresh export process traces it
            export(model, model_exp(workdir), "saved_model", path, log=quiet,
                   workdir=workdir, max_length=MAX_LENGTH, max_new_tokens=16)
        out[family] = (model, path)
    return out


def model_exp(workdir):
    from deepseek_tf.workdir import load_experiment
    return load_experiment(workdir)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_keras_over_32_steps(exported, family):
    model, path = exported[family]
    keras_ids, _ = Generator(model, MAX_LENGTH, stop_ids=(257,), pad_id=258).generate(
        [PROMPT], [len(PROMPT)], max_new_tokens=32)
    sm = tf.saved_model.load(path)
    out = sm.signatures["generate_ids"](input_ids=tf.constant([PROMPT]),
                                        lengths=tf.constant([len(PROMPT)]), **_options(1))
    assert out["output_ids"].numpy().tolist() == keras_ids.numpy().tolist()


def _xla_functions(fn) -> list[str]:
    """The names of the functions marked for XLA compilation in a loaded signature."""
    library = fn.graph.as_graph_def().library.function
    return [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]


def _compiles_with_xla(fn) -> bool:
    """Whether a loaded signature calls a function marked for XLA compilation."""
    return bool(_xla_functions(fn))


@pytest.mark.parametrize("prefill_jit", [0, MAX_LENGTH])
def test_xla_export_gives_the_same_tokens_and_runs_in_a_session(tmp_path, prefill_jit):
    """--jit_compile exports an XLA decode loop (TF Serving needs
    --xla_cpu_compilation_enabled=true, as serving/Dockerfile sets) and each generating
    signature again without XLA (`*_no_xla`, for a server without it); with
    `prefill_jit` (what `auto` may pick) the prefill is a second XLA function, at the
    prompt's bucketed width. The tokens of both are the Keras generator's, also through
    saved_model_cli's session-based loader. (The model server binary itself does not
    install here.)"""
    workdir, model = make_workdir(str(tmp_path / "run"), "mla_moe")
    path = str(tmp_path / "sm")
    export(model, model_exp(workdir), "saved_model", path, log=quiet, workdir=workdir,
           max_length=MAX_LENGTH, jit_compile=True, prefill_jit=prefill_jit)
    keras_ids, _ = Generator(model, MAX_LENGTH, stop_ids=(257,), pad_id=258).generate(
        [PROMPT], [len(PROMPT)], max_new_tokens=24)
    sm = tf.saved_model.load(path)
    assert {"generate_ids_no_xla", "serving_default_no_xla"} <= set(sm.signatures)
    for name, xla in (("generate_ids", True), ("generate_ids_no_xla", False)):
        out = sm.signatures[name](input_ids=tf.constant([PROMPT]),
                                  lengths=tf.constant([len(PROMPT)]), **_options(1, n=24))
        assert out["output_ids"].numpy().tolist() == keras_ids.numpy().tolist(), name
        compiled = _xla_functions(sm.signatures[name])
        assert bool(compiled) == xla, (name, compiled)
        assert any("prefill" in f for f in compiled) == (xla and bool(prefill_jit)), compiled
        run = _saved_model_cli_run(path, tmp_path, PROMPT[:3], 5, signature=name)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "[5]" in run.stdout


def test_text_signature_runs_the_tokenizer_in_the_graph(exported):
    model, path = exported["gqa"]
    tok = ByteTokenizer()
    prompts = ["The quick", "héllo, wörld"]
    sm = tf.saved_model.load(path)
    out = sm.signatures["serving_default"](prompt=tf.constant(prompts), **_options(2, n=20))
    gen = Generator(model, MAX_LENGTH, stop_ids=(tok.eos_id,), pad_id=tok.pad_id)
    for i, text in enumerate(prompts):
        ids = tok.encode(text, add_eos=False)
        expect, n = gen.generate([ids], [len(ids)], max_new_tokens=20)
        keep = [t for t in expect.numpy()[0, :n[0]] if t < 256]
        assert out["text"].numpy()[i] == bytes(keep)
        assert out["num_tokens"].numpy()[i] == n.numpy()[0]


def test_unseeded_sampled_requests_differ_and_a_seed_reproduces(exported):
    sm = tf.saved_model.load(exported["gqa"][1])
    text = sm.signatures["serving_default"]
    sampled = dict(prompt=tf.constant(["The quick"] * 2), **_options(2, n=24, temperature=1.0))
    unseeded = {**sampled, "seed": tf.constant([-1, -1])}
    a, b = (text(**unseeded)["text"].numpy().tolist() for _ in range(2))
    assert a != b and a[0] != a[1]  # requests, and rows of one batch, draw their own seeds
    seeded = [text(**sampled)["text"].numpy().tolist() for _ in range(2)]  # seed 0
    assert seeded[0] == seeded[1] and seeded[0][0] == seeded[0][1]


def test_score_gives_next_token_log_probs(exported):
    model, path = exported["mla_moe"]
    ids = np.array([PROMPT, PROMPT[:6] + [0] * 4], np.int32)
    out = tf.saved_model.load(path).signatures["score"](input_ids=tf.constant(ids),
                                                        lengths=tf.constant([10, 6]))
    logp = tf.nn.log_softmax(model(tf.constant(ids[:1]))).numpy()[0]
    expect = [0.0] + [logp[t - 1, PROMPT[t]] for t in range(1, 10)]
    np.testing.assert_allclose(out["log_probs"].numpy()[0], expect, atol=1e-4)
    np.testing.assert_allclose(out["log_probs"].numpy()[1, :6], expect[:6], atol=1e-4)
    assert (out["log_probs"].numpy()[1, 6:] == 0).all()
    np.testing.assert_allclose(out["total_log_prob"].numpy()[0], sum(expect), rtol=1e-5)


def test_saved_model_cli_shows_batched_signatures_and_runs_one(exported, tmp_path):
    path = exported["gqa"][1]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    shown = subprocess.run([cli, "show", "--all", "--dir", path], capture_output=True,
                           text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for sig in ("serving_default", "generate_ids", "score"):
        body = shown.stdout.split(f"signature_def['{sig}']")[1].split("signature_def[")[0]
        shapes = re.findall(r"shape: (\([^)]*\)|unknown_rank)", body)
        assert shapes and all(s.startswith("(-1") for s in shapes), (sig, shapes)
    run = _saved_model_cli_run(path, tmp_path, [256, 84, 104], 5)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "output_lengths" in run.stdout and "[5]" in run.stdout


def _saved_model_cli_run(path, tmp_path, prompt, n, signature="generate_ids"):
    """`saved_model_cli run` of a generate_ids signature (a session-based loader, as TF
    Serving's)."""
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    feeds = dict(input_ids=np.array([prompt], np.int32), lengths=np.array([len(prompt)], np.int32),
                 max_new_tokens=np.array([n], np.int32), temperature=np.zeros([1], np.float32),
                 top_k=np.zeros([1], np.int32), top_p=np.ones([1], np.float32),
                 seed=np.zeros([1], np.int32))
    for name, value in feeds.items():
        np.save(os.path.join(tmp_path, f"{name}.npy"), value)
    inputs = ";".join(f"{n}={os.path.join(tmp_path, n)}.npy" for n in feeds)
    return subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                           signature, "--inputs", inputs], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)


def test_client_over_rest_and_grpc_gets_the_keras_text(exported):
    model, path = exported["mla"]
    models = tf_serving.Models({"deepseek": os.path.dirname(path)})
    tok = ByteTokenizer()
    ids = tok.encode("The quick", add_eos=False)
    expect, n = Generator(model, MAX_LENGTH, stop_ids=(257,), pad_id=258).generate(
        [ids], [len(ids)], max_new_tokens=12)
    text = bytes(t for t in expect.numpy()[0, :n[0]] if t < 256).decode("utf-8", "replace")
    inputs = client.build_inputs("serving_default", prompts=["The quick"], max_new_tokens=12,
                                 temperature=0.0, top_k=0, top_p=1.0, seed=0)
    with tf_serving.rest_server(models) as rest, tf_serving.grpc_server(models) as grpc_port:
        for fmt in ("rows", "columnar"):
            out = client.predict_rest(inputs, port=rest, fmt=fmt, timeout=60)
            assert out["text"] == [text]
        out = client.predict_grpc(inputs, port=grpc_port, timeout=60)
        assert out["text"] == [text]
        # Defaults stored in the SignatureDef fill the options a request leaves out.
        out = client.predict_rest({"prompt": ["The quick"]}, port=rest, timeout=60)
        assert out["num_tokens"] == [16]


def test_bad_requests_get_invalid_argument_with_the_message(exported):
    path = exported["gqa"][1]
    models = tf_serving.Models({"deepseek": os.path.dirname(path)})
    good = client.build_inputs("serving_default", prompts=["x"], max_new_tokens=8,
                               temperature=0.0, top_k=0, top_p=1.0, seed=0)
    cases = [({**good, "max_new_tokens": [500]}, "max_new_tokens too large"),
             ({**good, "max_new_tokens": [0]}, "max_new_tokens must be >= 1"),
             ({**good, "top_p": [2.0]}, "top_p must be > 0 and <= 1"),
             ({**good, "prompt": ["x" * 80]}, "prompt is longer than the cache allows")]
    with tf_serving.rest_server(models) as rest, tf_serving.grpc_server(models) as grpc_port:
        for inputs, message in cases:
            for call in (lambda i: client.predict_rest(i, port=rest, timeout=60),
                         lambda i: client.predict_grpc(i, port=grpc_port, timeout=60)):
                with pytest.raises(client.ServingError) as e:
                    call(inputs)
                assert message in str(e.value) and e.value.exit_code == client.BAD_INPUT
                assert "HTTP 400" in str(e.value) or "INVALID_ARGUMENT" in str(e.value)
        ids = {"input_ids": [[1.5, 2.0]], "lengths": [2]}  # wrong dtype
        with pytest.raises(client.ServingError, match="HTTP 400"):
            client.predict_rest(ids, signature="score", port=rest, timeout=60)
        ids = {"input_ids": [1, 2], "lengths": [2]}        # wrong rank
        with pytest.raises(client.ServingError, match="INVALID_ARGUMENT"):
            client.predict_grpc(ids, signature="score", port=grpc_port, timeout=60)


def test_int8_export_is_smaller_and_close(tmp_path):
    """int8 weights: the variables shrink below half, and per-token log-probs stay
    within 0.05 nats + 3% of the float export's (quantization mutates the model, so
    each export gets its own copy: same seed, same weights)."""
    size = dict(hidden_size=64, intermediate_size=128)
    sizes, scores = {}, {}
    for mode in ("none", "int8"):
        workdir, model = make_workdir(str(tmp_path / f"run_{mode}"), "gqa", **size)
        path = str(tmp_path / mode)
        export(model, model_exp(workdir), "saved_model", path, log=quiet, workdir=workdir,
               max_length=MAX_LENGTH, quantize=mode)
        sizes[mode] = os.path.getsize(os.path.join(path, "variables",
                                                   "variables.data-00000-of-00001"))
        out = tf.saved_model.load(path).signatures["score"](
            input_ids=tf.constant([PROMPT]), lengths=tf.constant([len(PROMPT)]))
        scores[mode] = out["log_probs"].numpy()
    assert sizes["int8"] < 0.5 * sizes["none"], sizes
    np.testing.assert_allclose(scores["int8"], scores["none"], rtol=0.03, atol=0.05)


def test_hf_tokenizer_export_serves_ids_and_says_so(tmp_path):
    """An HF tokenizer.json cannot run in a TF graph: the export says so in one note and
    serving_default takes and returns ids (the generate_ids contract)."""
    from deepseek_tf.data.tokenizer.hf import HFTokenizer
    from tests.helpers.corpora import DOCS, build_hf_tokenizer
    src = build_hf_tokenizer(str(tmp_path / "hf"), DOCS, vocab_size=300)
    workdir, model = make_workdir(str(tmp_path / "run"), "gqa", vocab_size=320)
    HFTokenizer.from_path(src).save(os.path.join(workdir, "tokenizer"))
    notes = []
    path = str(tmp_path / "sm")
    export(model, model_exp(workdir), "saved_model", path, log=notes.append, workdir=workdir,
           max_length=MAX_LENGTH)
    assert any("cannot run inside a TensorFlow graph" in n and "token ids" in n for n in notes)
    sig = tf.saved_model.load(path).signatures["serving_default"]
    assert set(sig.structured_input_signature[1]) >= {"input_ids", "lengths"}
    out = sig(input_ids=tf.constant([[1, 40, 41]]), lengths=tf.constant([3]), **_options(1, n=4))
    assert out["output_lengths"].numpy().tolist() == [4]
