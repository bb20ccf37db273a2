"""In-process stand-ins for tensorflow_model_server: its gRPC and REST Predict APIs.

tensorflow_model_server cannot be installed on this machine (no docker registry to pull
tensorflow/serving from, and the binary is on neither PyPI nor Debian), so the client tests
talk to these servers instead. They serve SavedModels loaded with tf.saved_model.load on
127.0.0.1 (ephemeral ports) and follow TF Serving's predict API as serving/client.py uses it:

- `Models`: model name -> versions (numeric subdirs of a base dir, like TF Serving's
  base_path) and version labels; no version means the latest. Missing inputs are filled from
  the SignatureDef's `defaults` map (as-is: a [1] default is not tiled to the batch);
  without a default they are an INVALID_ARGUMENT.
- gRPC (`grpc_server`): PredictionService.Predict (model_spec name / version / version_label
  / signature_name, TensorProto inputs) and GetModelMetadata (the signature_def map).
- REST (`rest_server`): POST /v1/models/NAME[/versions/N|/labels/L]:predict with row
  `instances` (reply `{"predictions": ...}`: bare values for a single output, else one dict
  per row) or columnar `inputs` (reply `{"outputs": ...}`); strings are JSON strings
  (`{"b64": ...}` accepted, and sent back for non-UTF-8 bytes); GET /v1/models/NAME for the
  version status and GET .../metadata for the signatures.
- Errors: tf.errors.InvalidArgumentError from the graph, unknown/missing inputs and wrong
  dtypes -> INVALID_ARGUMENT / HTTP 400 `{"error": message}`; an unknown model or version
  -> NOT_FOUND / HTTP 404; an unknown signature -> FAILED_PRECONDITION / HTTP 400.
- `Models.delay_s` delays every Predict (to test client timeouts).

The real server is exercised by serving/smoke_test.sh on machines that have docker.
"""

import base64
import contextlib
import json
import os
import re
import socket
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_CODES = {c.value[0]: c for c in grpc.StatusCode}  # TF error codes are gRPC's numbers
_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
         grpc.StatusCode.NOT_FOUND: 404}


class ServingError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


class Servable:
    """One loaded version: its SignatureDefs (from saved_model.pb) and callables."""

    def __init__(self, path, version):
        self.version = version
        self.loaded = tf.saved_model.load(path)
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        graph = next(g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags)
        self.signature_defs = dict(graph.signature_def)
        self.signature_defs.pop("__saved_model_init_op", None)

    def run(self, signature, inputs, proto_dtypes=None):
        """inputs: {alias: array-like}; proto_dtypes: {alias: DataType} sent over gRPC."""
        sig = self.signature_defs.get(signature)
        if sig is None or signature not in self.loaded.signatures:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{signature}" not found.')
        extra = sorted(set(inputs) - set(sig.inputs))
        if extra:
            raise _invalid(f"input tensor alias not found in signature: {', '.join(extra)}. "
                           f"Inputs expected to be in the set {{{', '.join(sorted(sig.inputs))}}}.")
        missing = sorted(n for n in sig.inputs if n not in inputs and n not in sig.defaults)
        if missing:
            raise _invalid(f"Request is missing inputs {{{', '.join(missing)}}} and signature "
                           f"'{signature}' has no defaults for them: send them.")
        feeds = {}
        for name, info in sig.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            if proto_dtypes and name in proto_dtypes and proto_dtypes[name] != info.dtype:
                raise _invalid(f"Expects arg '{name}' to be {dtype.name} but "
                               f"{tf.dtypes.as_dtype(proto_dtypes[name]).name} is provided")
            value = inputs[name] if name in inputs else tf.make_ndarray(sig.defaults[name])
            try:
                if dtype == tf.string:
                    value = np.vectorize(_to_bytes, otypes=[object])(np.asarray(value, object))
                feeds[name] = tf.constant(value, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise _invalid(f"input '{name}' is not a rectangular {dtype.name} tensor: "
                               f"{e}") from None
        try:
            outputs = self.loaded.signatures[signature](**feeds)
        except tf.errors.OpError as e:
            raise ServingError(_CODES.get(e.error_code, grpc.StatusCode.INTERNAL),
                               e.message) from None
        except (TypeError, ValueError) as e:  # shape/rank mismatch caught while binding
            raise _invalid(str(e)) from None
        return {name: value.numpy() for name, value in outputs.items()}


def _to_bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class Models:
    """model name -> {version: Servable}, from base dirs laid out as TF Serving expects."""

    def __init__(self, base_paths, labels=None, delay_s=0.0):
        self.versions = {}
        for name, base in base_paths.items():
            found = sorted(int(d) for d in os.listdir(base) if d.isdigit()
                           and os.path.exists(os.path.join(base, d, "saved_model.pb")))
            self.versions[name] = {v: Servable(os.path.join(base, str(v)), v) for v in found}
        self.labels = labels or {}
        self.delay_s = delay_s

    def resolve(self, name, version=None, label=None):
        versions = self.versions.get(name)
        if label:
            version = self.labels.get(name, {}).get(label)
            if version is None:
                raise _invalid(f"Unrecognized servable version label: {label}")
        request = f"Specific({name}, {version})" if version else f"Latest({name})"
        if not versions or (version is not None and version not in versions):
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: {request}")
        return versions[version if version is not None else max(versions)]

    def predict(self, name, version, label, signature, inputs, proto_dtypes=None):
        servable = self.resolve(name, version, label)
        if self.delay_s:
            time.sleep(self.delay_s)
        return servable, servable.run(signature or "serving_default", inputs, proto_dtypes)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models):
        self.models = models

    def Predict(self, request, context):
        spec = request.model_spec
        try:
            inputs = {k: tf.make_ndarray(t) for k, t in request.inputs.items()}
            servable, outputs = self.models.predict(
                spec.name, spec.version.value if spec.HasField("version") else None,
                spec.version_label, spec.signature_name, inputs,
                {k: t.dtype for k, t in request.inputs.items()})
        except ServingError as e:
            context.abort(e.code, e.message)
        reply = predict_pb2.PredictResponse()
        reply.model_spec.name = spec.name
        reply.model_spec.version.value = servable.version
        reply.model_spec.signature_name = spec.signature_name or "serving_default"
        for name, value in outputs.items():
            reply.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return reply

    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        try:
            servable = self.models.resolve(
                spec.name, spec.version.value if spec.HasField("version") else None,
                spec.version_label)
        except ServingError as e:
            context.abort(e.code, e.message)
        reply = get_model_metadata_pb2.GetModelMetadataResponse()
        reply.model_spec.name = spec.name
        reply.model_spec.version.value = servable.version
        reply.metadata["signature_def"].Pack(_signature_map(servable))
        return reply


def _signature_map(servable):
    sigs = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sigs.signature_def[key].CopyFrom(sig)
    return sigs


@contextlib.contextmanager
def grpc_server(models):
    """A gRPC PredictionService on 127.0.0.1; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(models), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(5)


# ---- REST ----

_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?"
                   r"(:predict|/metadata)?$")


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return [_from_json(v) for v in value] if isinstance(value, list) else value


def _to_json(array):
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}
        return v
    return convert(np.asarray(array).tolist())


def _rest_inputs(body, servable, signature):
    sig = servable.signature_defs.get(signature)
    aliases = list(sig.inputs) if sig is not None else []
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("Missing 'inputs' or 'instances' key (send exactly one of them)")
    if "inputs" in body:
        cols = body["inputs"]
        if isinstance(cols, dict):
            return {k: _from_json(v) for k, v in cols.items()}, False
        if len(aliases) != 1:
            raise _invalid("Bare 'inputs' value needs a signature with one input: name them")
        return {aliases[0]: _from_json(cols)}, False
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise _invalid("'instances' must be a non-empty list")
    if not isinstance(rows[0], dict):
        if len(aliases) != 1:
            raise _invalid("Bare 'instances' values need a signature with one input: use "
                           "one object per instance with named inputs")
        return {aliases[0]: _from_json(rows)}, True
    keys = set(rows[0])
    if any(not isinstance(r, dict) or set(r) != keys for r in rows):
        raise _invalid("Every instance in 'instances' must have the same named inputs")
    return {k: [_from_json(r[k]) for r in rows] for k in keys}, True


class _Handler(BaseHTTPRequestHandler):
    models = None  # set on the subclass made by rest_server

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status, payload):
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _route(self, method):
        match = _PATH.match(self.path)
        if not match or (method == "POST") != (match.group(4) == ":predict"):
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Malformed request: {method} {self.path}")
        name, version, label, action = match.groups()
        return name, int(version) if version else None, label, action

    def do_GET(self):
        try:
            name, version, label, action = self._route("GET")
            if action == "/metadata":
                servable = self.models.resolve(name, version, label)
                return self._reply(200, {
                    "model_spec": {"name": name, "version": str(servable.version)},
                    "metadata": {"signature_def": json_format.MessageToDict(
                        _signature_map(servable))}})
            if label or version:
                versions = [self.models.resolve(name, version, label).version]
            else:
                self.models.resolve(name)
                versions = sorted(self.models.versions[name], reverse=True)
            self._reply(200, {"model_version_status": [
                {"version": str(v), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}} for v in versions]})
        except ServingError as e:
            self._reply(_HTTP.get(e.code, 500), {"error": e.message})

    def do_POST(self):
        try:
            name, version, label, _ = self._route("POST")
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length).decode("utf-8"))
            except ValueError as e:
                raise _invalid(f"JSON Parse error: {e}") from None
            if not isinstance(body, dict):
                raise _invalid("The request body must be a JSON object")
            signature = body.get("signature_name") or "serving_default"
            inputs, rows = _rest_inputs(body, self.models.resolve(name, version, label),
                                        signature)
            _, outputs = self.models.predict(name, version, label, signature, inputs)
        except ServingError as e:
            return self._reply(_HTTP.get(e.code, 500), {"error": e.message})
        if not rows:
            out = {k: _to_json(v) for k, v in outputs.items()}
            return self._reply(200, {"outputs": next(iter(out.values())) if len(out) == 1
                                     else out})
        if len(outputs) == 1:
            return self._reply(200, {"predictions": _to_json(next(iter(outputs.values())))})
        batch = len(next(iter(outputs.values())))
        self._reply(200, {"predictions": [{k: _to_json(v[i]) for k, v in outputs.items()}
                                          for i in range(batch)]})


@contextlib.contextmanager
def rest_server(models):
    """TF Serving's REST API on 127.0.0.1 (ThreadingHTTPServer); yields its port."""
    handler = type("Handler", (_Handler,), {"models": models})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port():
    """A 127.0.0.1 port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
