"""The SavedModel of a chat run: it stops at the template's end-of-turn marker (a
multi-token `<|im_end|>` with the byte tokenizer), `serving_default` wraps the prompt in
the template, and the `chat` signature (messages in, reply out, the template rendered in
the graph) answers through `saved_model_cli run` and over REST and gRPC (the in-process
TF Serving stand-ins of tests/helpers/tf_serving.py)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.export import export, load_workdir
from deepseek_tf.export.chat import ChatRenderer
from deepseek_tf.generate.text import chat_prompt_ids
from tests.helpers import tf_serving
from tests.helpers.workdirs import train_chat_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("serving_client",
                                               os.path.join(ROOT, "serving", "client.py"))
client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client)

TOK = ByteTokenizer()
IM_END = TOK.encode("<|im_end|>", add_bos=False, add_eos=False).tolist()
NEW = 32  # the export's default max_new_tokens: a run that never stops makes all 32
quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """(workdir, SavedModel dir) of a ChatML SFT run that learned to answer "ok"."""
    root = tmp_path_factory.mktemp("chatml")
    workdir = train_chat_run(str(root))
    model, exp = load_workdir(workdir)
    path = str(root / "models" / "deepseek" / "1")
    export(model, exp, "saved_model", path, log=quiet, workdir=workdir, max_length=128,
           max_new_tokens=NEW)
    return workdir, path


def _options(b):
    """Every sampling input (Python-side signatures ignore SignatureDef defaults)."""
    return dict(max_new_tokens=tf.fill([b], NEW), temperature=tf.zeros([b]),
                top_k=tf.zeros([b], tf.int32), top_p=tf.ones([b]), seed=tf.fill([b], -1))


def test_chatml_sft_export_stops_at_im_end(chat_export):
    sm = tf.saved_model.load(chat_export[1])
    out = sm.signatures["serving_default"](prompt=tf.constant(["Hi 3", "Hi 17"]), **_options(2))
    assert out["text"].numpy().tolist() == [b"ok", b"ok"]
    assert out["num_tokens"].numpy().tolist() == [2 + len(IM_END)] * 2  # < NEW: it stopped
    ids = chat_prompt_ids([("user", "Hi 3")], TOK, TEMPLATES["chatml"])
    gen = sm.signatures["generate_ids"](input_ids=tf.constant([ids]),
                                        lengths=tf.constant([len(ids)]), **_options(1))
    n = int(gen["output_lengths"][0])
    assert gen["output_ids"].numpy()[0, :n].tolist() == TOK.encode("ok", add_bos=False,
                                                                  add_eos=False).tolist() + IM_END


def test_chat_signature_answers_through_saved_model_cli(chat_export):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    run = subprocess.run(
        [cli, "run", "--dir", chat_export[1], "--tag_set", "serve", "--signature_def", "chat",
         "--input_exprs", "roles=[['user']];contents=[['Hi 5']];num_messages=[1];"
         "max_new_tokens=[32];temperature=[0.0];top_k=[0];top_p=[1.0];seed=[-1]"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[b'ok']" in run.stdout and "[12]" in run.stdout, run.stdout


def _python_replies(workdir, conversations):
    """Greedy replies of the Python path (chat_prompt_ids + run_batches, the run's profile)."""
    from deepseek_tf.generate.run import run_batches
    from deepseek_tf.generate.text import chat_profile

    model, exp = load_workdir(workdir)
    profile = chat_profile(exp, TOK)
    prompts = [chat_prompt_ids(c, TOK, profile.template) for c in conversations]
    return [r["completion"] for r in run_batches(
        model, TOK, prompts, 128, profile.stops, profile.stop_strings, max_new_tokens=NEW)]


def test_chat_signature_answers_over_rest_and_grpc(chat_export):
    models = tf_serving.Models({"deepseek": os.path.dirname(chat_export[1])})
    conversations = [[("user", "Hi 2")], [("system", "Be brief."), ("user", "Hi 4")]]
    expect = _python_replies(chat_export[0], conversations)
    assert expect[0] == "ok"
    inputs = client.build_inputs("chat", messages=conversations[1], max_new_tokens=NEW)
    assert inputs["roles"] == [["system", "user"]]  # multi-turn: test_in_graph_rendering
    batch = {**client.chat_inputs(conversations), "temperature": [0.0, 0.0]}
    with tf_serving.rest_server(models) as rest, tf_serving.grpc_server(models) as grpc_port:
        for fmt in ("rows", "columnar"):
            out = client.predict_rest(inputs, signature="chat", port=rest, fmt=fmt, timeout=60)
            assert out["reply"] == expect[1:]
        out = client.predict_grpc(client.build_inputs("chat", prompts=["Hi 2"]),
                                  signature="chat", port=grpc_port, timeout=60)
        assert out["reply"] == ["ok"] and out["num_tokens"] == [2 + len(IM_END)]
        out = client.predict_rest(batch, signature="chat", port=rest, fmt="columnar", timeout=60)
        assert out["reply"] == expect  # a padded shorter conversation; defaults filled in
        bad = client.build_inputs("chat", messages=[("user", "Hi"), ("assistant", "ok")])
        with pytest.raises(client.ServingError, match="the last message must be from user"):
            client.predict_grpc(bad, signature="chat", port=grpc_port, timeout=60)
        with pytest.raises(client.ServingError, match="HTTP 400.*alternating"):
            client.predict_rest(client.build_inputs("chat", messages=[("assistant", "x"),
                                                                      ("user", "y")]),
                                signature="chat", port=rest, timeout=60)


def test_client_cli_sends_a_conversation(chat_export, capsys):
    models = tf_serving.Models({"deepseek": os.path.dirname(chat_export[1])})
    with tf_serving.rest_server(models) as rest:
        code = client.main(["--signature=chat", "--message=user:Hi 1", f"--rest_port={rest}"])
    assert code == 0 and capsys.readouterr().out == "ok\n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_in_graph_rendering_equals_training(name):
    """Every template, with system text, history, a reasoning answer and a tool turn, padded
    like TF Serving's batching pads (any value past num_messages)."""
    t = TEMPLATES[name]
    convs = [[("user", "Hi")],
             [("system", "Be brief."), ("user", "Q1"), ("assistant", "<think>r</think>\n\nA1"),
              ("user", "Q2 é")],
             [("user", "Q1"), ("assistant", "A1"), ("tool", "{\"t\": 1}")]]
    m = max(len(c) for c in convs)
    roles = [[r for r, _ in c] + ["junk"] * (m - len(c)) for c in convs]
    contents = [[x for _, x in c] + ["pad"] * (m - len(c)) for c in convs]
    ids, lengths = ChatRenderer(t, TOK, TOK.tf_tokenizer())(
        tf.constant(roles), tf.constant(contents), tf.constant([len(c) for c in convs]))
    for i, conv in enumerate(convs):
        expect = chat_prompt_ids(conv, TOK, t)
        np.testing.assert_array_equal(ids.numpy()[i, :lengths[i]], expect)
