"""serving/client.py against in-process TF Serving stand-ins (tests/helpers/tf_serving.py).

A tiny stand-in SavedModel with the exporter's signature contract (every input/output
batched): serving_default upper-cases the prompt and cuts it to max_new_tokens characters,
generate_ids echoes the ids, score gives -0.5 per scored token. Version 1 has no
SignatureDef defaults, version 2 has them for the five sampling inputs.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2  # noqa: F401
from tensorflow_serving.config import model_server_config_pb2

from tests.helpers import tf_serving

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVING = os.path.join(ROOT, "serving")
CLIENT_PY = os.path.join(SERVING, "client.py")
_spec = importlib.util.spec_from_file_location("deepseek_serving_client", CLIENT_PY)
client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client)

MAX_NEW_TOKENS = 64
S = tf.TensorSpec
SAMPLING_SPECS = [S([None], tf.int32, "max_new_tokens"), S([None], tf.float32, "temperature"),
                  S([None], tf.int32, "top_k"), S([None], tf.float32, "top_p"),
                  S([None], tf.int32, "seed")]


def _check_max_new_tokens(n):
    message = f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}: send a value in that range"
    return [tf.debugging.assert_greater_equal(n, 1, message=message),
            tf.debugging.assert_less_equal(n, MAX_NEW_TOKENS, message=message)]


def build_standin(path, with_defaults):
    """Save the stand-in SavedModel; sampling inputs may be [1] (defaults) or [B]."""
    defaults = (tf.constant([64]), tf.constant([0.0]), tf.constant([0]), tf.constant([1.0]),
                tf.constant([0]))

    def serve(prompt, max_new_tokens, temperature, top_k, top_p, seed):
        n = tf.broadcast_to(max_new_tokens, tf.shape(prompt))
        with tf.control_dependencies(_check_max_new_tokens(n)):
            text = tf.strings.substr(tf.strings.upper(prompt), tf.zeros_like(n), n,
                                     unit="UTF8_CHAR")
        return {"text": text, "num_tokens": tf.strings.length(text)}

    def generate_ids(input_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed):
        n = tf.broadcast_to(max_new_tokens, tf.shape(lengths))
        with tf.control_dependencies(_check_max_new_tokens(n)):
            return {"output_ids": tf.identity(input_ids),
                    "output_lengths": tf.minimum(lengths, n)}

    def score(input_ids, lengths):
        t = tf.range(tf.shape(input_ids)[1])
        scored = tf.sequence_mask(lengths, tf.shape(input_ids)[1]) & (t >= 1)[None, :]
        log_probs = tf.where(scored, -0.5, 0.0)
        return {"log_probs": log_probs, "total_log_prob": tf.reduce_sum(log_probs, axis=1)}

    if with_defaults:
        serve.__defaults__ = generate_ids.__defaults__ = defaults
    module = tf.Module()
    module.serve = tf.function(serve, input_signature=[S([None], tf.string, "prompt")]
                               + SAMPLING_SPECS)
    module.generate_ids = tf.function(generate_ids, input_signature=[
        S([None, None], tf.int32, "input_ids"), S([None], tf.int32, "lengths")] + SAMPLING_SPECS)
    module.score = tf.function(score, input_signature=[
        S([None, None], tf.int32, "input_ids"), S([None], tf.int32, "lengths")])
    twins = {"serving_default_no_xla": module.serve} if with_defaults else {}  # version 2
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.serve, "generate_ids": module.generate_ids,
        "score": module.score, **twins})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models") / "deepseek")
    build_standin(os.path.join(base, "1"), with_defaults=False)
    build_standin(os.path.join(base, "2"), with_defaults=True)
    models = tf_serving.Models({"deepseek": base},
                               labels={"deepseek": {"stable": 1, "canary": 2}})
    with tf_serving.rest_server(models) as rest, tf_serving.grpc_server(models) as grpc_port:
        yield types.SimpleNamespace(base=base, models=models, rest=rest, grpc=grpc_port)


def ask(served, protocol, inputs, **kwargs):
    port = served.grpc if protocol == "grpc" else served.rest
    return client.predict(inputs, protocol=protocol, port=port, **kwargs)


def failure(served, protocol, inputs, **kwargs):
    with pytest.raises(client.ServingError) as info:
        ask(served, protocol, inputs, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def run_cli(*args):
    """As a user runs it: without the suite's TF_CPP_MIN_LOG_LEVEL (the client sets its own)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, CLIENT_PY, *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_deployment_configs_are_consistent():
    config = text_format.Parse(open(os.path.join(SERVING, "models.config")).read(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path) == ("deepseek", "/models/deepseek")
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}
    dockerfile = open(os.path.join(SERVING, "Dockerfile")).read()
    assert "FROM tensorflow/serving:2.20.0" in dockerfile
    for flag in ("--port=8500", "--rest_api_port=8501", "--model_config_file=",
                 "--enable_batching", "--batching_parameters_file=", "--monitoring_config_file="):
        assert flag in dockerfile, flag
    monitoring = open(os.path.join(SERVING, "monitoring.config")).read()
    assert "/monitoring/prometheus/metrics" in monitoring
    import yaml
    docs = list(yaml.safe_load_all(open(os.path.join(SERVING, "k8s", "deployment.yaml"))))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    (container,) = docs[0]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/deepseek"
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    assert "8501:8501" in yaml.safe_load(open(os.path.join(SERVING, "docker-compose.yml")))[
        "services"]["deepseek-serving"]["ports"]
    smoke = open(os.path.join(SERVING, "smoke_test.sh")).read()
    assert "set -euo pipefail" in smoke and "exit 2" in smoke


def test_saved_model_cli_shows_batched_signatures_and_runs_one(served):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--all", "--dir", os.path.join(served.base, "2")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for name in ("serving_default", "generate_ids", "score"):
        assert f"signature_def['{name}']" in shown.stdout
    assert "shape: (-1)" in shown.stdout and "shape: (-1, -1)" in shown.stdout
    assert "shape: ()" not in shown.stdout  # no scalars: TF Serving batching needs dim 0
    ran = subprocess.run([cli, "run", "--dir", os.path.join(served.base, "1"), "--tag_set",
                          "serve", "--signature_def", "score", "--input_exprs",
                          "input_ids=[[5, 6, 7, 0]];lengths=[3]"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "total_log_prob" in ran.stdout and "[-1.]" in ran.stdout


@pytest.mark.parametrize("protocol,fmt", [("rest", "rows"), ("rest", "columnar"),
                                          ("grpc", None)])
def test_generates_text(served, protocol, fmt):
    inputs = client.build_inputs("serving_default", ["hello", "ab", "été"], max_new_tokens=3)
    out = ask(served, protocol, inputs, fmt=fmt, label="stable")
    assert out == {"text": ["HEL", "AB", "éTé"], "num_tokens": [3, 2, 5]}  # bytes


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_other_signatures(served, protocol):
    ids = [[5, 6, 7], [8, 9]]
    out = ask(served, protocol, client.build_inputs("generate_ids", ids=ids, max_new_tokens=2),
              signature="generate_ids", version=1)
    assert out == {"output_ids": [[5, 6, 7], [8, 9, 0]], "output_lengths": [2, 2]}
    inputs = client.build_inputs("score", ids=ids)
    assert set(inputs) == {"input_ids", "lengths"}
    out = ask(served, protocol, inputs, signature="score", fmt="columnar")
    assert out["total_log_prob"] == [-1.0, -0.5]
    assert client.render("score", inputs, out) == ("-1.0000\t0.0000,-0.5000,-0.5000\n"
                                                   "-0.5000\t0.0000,-0.5000")


def test_cli_in_process(served, capsys):
    assert client.main(["--prompt=hello", "--prompt=xy", f"--rest_port={served.rest}",
                        "--max_new_tokens=4", "--version=2"]) == 0
    assert capsys.readouterr().out == "HELL\nXY\n"
    assert client.main(["--protocol=grpc", f"--grpc_port={served.grpc}", "--label=canary",
                        "--signature=generate_ids", "--ids=1,2,3", "--max_new_tokens=2"]) == 0
    assert capsys.readouterr().out == "1,2\n"
    assert client.main(["--signature=score", "--ids=4,5", f"--rest_port={served.rest}",
                        "--json", "--format=columnar"]) == 0
    assert json.loads(capsys.readouterr().out) == {"log_probs": [[0.0, -0.5]],
                                                  "total_log_prob": [-0.5]}
    # --no_xla calls the *_no_xla twin of an XLA export (here only version 2 has one)
    assert client.main(["--prompt=hi", f"--rest_port={served.rest}", "--max_new_tokens=4",
                        "--version=2", "--no_xla"]) == 0
    assert capsys.readouterr().out == "HI\n"
    assert client.main(["--prompt=hi", f"--rest_port={served.rest}", "--version=1",
                        "--no_xla"]) == 2
    assert "serving_default_no_xla" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_signature_defaults_fill_missing_inputs(served, protocol):
    """Version 2 has SignatureDef defaults, so a bare prompt works; version 1 needs all."""
    assert ask(served, protocol, {"prompt": ["hi"]}, version=2)["text"] == ["HI"]
    error = failure(served, protocol, {"prompt": ["hi"]}, version=1)
    assert error.exit_code == client.BAD_INPUT and "max_new_tokens" in str(error)


@pytest.mark.parametrize("protocol,code", [("rest", "HTTP 400"), ("grpc", "INVALID_ARGUMENT")])
def test_bad_request_is_one_line_with_the_graph_message(served, protocol, code):
    error = failure(served, protocol, client.build_inputs("serving_default", ["hi"],
                                                          max_new_tokens=0))
    assert error.exit_code == client.BAD_INPUT
    assert code in str(error) and "max_new_tokens must be in 1..64" in str(error)
    error = failure(served, protocol, client.build_inputs("serving_default", ["hi"]),
                    model="nope")
    assert error.exit_code == client.BAD_INPUT
    assert ("HTTP 404" if protocol == "rest" else "NOT_FOUND") in str(error)
    assert "--model" in str(error)
    error = failure(served, protocol, client.build_inputs("score", ids=[[1]]), signature="nah")
    assert error.exit_code == client.BAD_INPUT and "nah" in str(error)


def test_cli_bad_request_and_server_down_are_one_line(served):
    proc = run_cli("--prompt=hi", "--max_new_tokens=999", f"--rest_port={served.rest}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "HTTP 400: max_new_tokens must be in 1..64: send a value in that range" in proc.stderr
    proc = run_cli("--prompt=hi", f"--rest_port={tf_serving.closed_port()}")
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Connection refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("--signature=score")
    assert proc.returncode == 2 and "--ids" in proc.stderr
    proc = run_cli("--protocol=grpc", f"--grpc_port={served.grpc}", "--prompt=hi",
                   "--max_new_tokens=0")  # imports TF: its startup logs must stay quiet
    assert proc.returncode == 2 and proc.stderr == (
        "error: gRPC 127.0.0.1:%d answered INVALID_ARGUMENT: max_new_tokens must be in 1..64: "
        "send a value in that range (change the request as the message says)\n" % served.grpc)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_server_down_and_timeout_exit_3(served, protocol):
    inputs = client.build_inputs("serving_default", ["hi"])
    with pytest.raises(client.ServingError) as info:
        client.predict(inputs, protocol=protocol, port=tf_serving.closed_port(), timeout=5)
    assert info.value.exit_code == client.UNREACHABLE
    assert ("Connection refused" if protocol == "rest" else "UNAVAILABLE") in str(info.value)
    served.models.delay_s = 1.5
    try:
        error = failure(served, protocol, inputs, timeout=0.3)
    finally:
        served.models.delay_s = 0.0
    assert error.exit_code == client.UNREACHABLE and "--timeout" in str(error)
    assert ("did not answer within 0.3 s" if protocol == "rest"
            else "DEADLINE_EXCEEDED") in str(error)


def test_status_and_metadata(served):
    import urllib.request
    url = f"http://127.0.0.1:{served.rest}/v1/models/deepseek"
    status = json.load(urllib.request.urlopen(url, timeout=10))
    assert [(s["version"], s["state"]) for s in status["model_version_status"]] == [
        ("2", "AVAILABLE"), ("1", "AVAILABLE")]
    meta = json.load(urllib.request.urlopen(url + "/labels/canary/metadata", timeout=10))
    sigs = meta["metadata"]["signature_def"]["signatureDef"]
    assert set(sigs) == {"serving_default", "generate_ids", "score", "serving_default_no_xla"}
    assert set(sigs["serving_default"]["defaults"]) == {
        "max_new_tokens", "temperature", "top_k", "top_p", "seed"}

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "deepseek"
    request.model_spec.version_label = "stable"
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc}") as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    reply.metadata["signature_def"].Unpack(sigs)
    assert reply.model_spec.version.value == 1  # stable -> version 1, which has no defaults
    assert not sigs.signature_def["serving_default"].defaults
