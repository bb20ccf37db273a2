#!/usr/bin/env python3
"""Query a deepseek_tf SavedModel served by TF Serving, over REST or gRPC.

  python serving/client.py --prompt="Hello"                          # REST, prints the text
  python serving/client.py --signature=chat --system="Be brief." --message="user:Hi" \
      --message="assistant:Hello!" --message="user:What is TF Serving?"
  python serving/client.py --prompt="Hello" --protocol=grpc --label=canary
  python serving/client.py --signature=generate_ids --ids=1,2,3 --max_new_tokens=8
  python serving/client.py --signature=score --ids="1,2,3;4,5" --json

Importable: build_inputs(), predict_rest(), predict_grpc(), predict(), render(), main();
failures raise ServingError(message, exit_code). REST uses only the standard library;
gRPC imports tensorflow and tensorflow-serving-api (slow to import, so only when used).
"""

import argparse
import base64
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request

OK, SERVER_ERROR, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3
EXIT_HELP = ("Exit codes: 0 ok; 1 the server failed (HTTP 5xx, other gRPC codes); 2 bad input "
             "(a bad flag, HTTP 400/404, gRPC INVALID_ARGUMENT/NOT_FOUND/FAILED_PRECONDITION); "
             "3 server unreachable (connection refused, timeout, gRPC UNAVAILABLE/"
             "DEADLINE_EXCEEDED). Errors are one 'error:' line on stderr.")
SIGNATURES = ("serving_default", "chat", "generate_ids", "score")
#: Sent for every row when not given: a signature without SignatureDef `defaults` needs all.
#: seed -1: the model draws a fresh seed per request (same seed >= 0, same text).
SAMPLING = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": -1}
ROLES = ("system", "user", "assistant", "tool")
_NP_DTYPES = {"prompt": object, "roles": object, "contents": object, "temperature": "float32",
              "top_p": "float32"}  # else int32


class ServingError(Exception):
    """A failed request; `exit_code` is BAD_INPUT, UNREACHABLE or SERVER_ERROR."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text, limit=400):
    """A server error as one line: a graph assert's own message if there is one, else the
    text without TF's node traces and with whitespace collapsed; long text is cut."""
    text = " ".join(str(text).split())
    failed = re.search(r"assertion failed: \[(.*?)\]", text)
    if failed:
        return failed.group(1)
    text = re.sub(r"\s*\[\[\{\{.*?\}\}\]\]|\s*\[Op:[^\]]*\]", "", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_ids(text):
    """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]] (';' separates batch rows)."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise ServingError(f"--ids={text!r} is not a list of integers: use e.g. --ids=1,2,3 "
                           "(';' between rows)", BAD_INPUT) from None
    if not rows or not all(rows):
        raise ServingError(f"--ids={text!r} has an empty row: every row needs a token id",
                           BAD_INPUT)
    return rows


def parse_message(text):
    """'user:Hi there' -> ('user', 'Hi there')."""
    role, sep, content = text.partition(":")
    if not sep or role.strip() not in ROLES:
        raise ServingError(f"--message={text!r}: write ROLE:TEXT with ROLE one of "
                           f"{', '.join(ROLES)} (e.g. --message='user:Hi')", BAD_INPUT)
    return role.strip(), content


def chat_inputs(conversations):
    """The chat signature's columns for a batch of conversations [[(role, content)]]:
    roles and contents [B, M] (short conversations padded with ""), num_messages [B]."""
    width = max(len(c) for c in conversations)
    pad = lambda row: row + [""] * (width - len(row))  # noqa: E731
    return {"roles": [pad([r for r, _ in c]) for c in conversations],
            "contents": [pad([t for _, t in c]) for c in conversations],
            "num_messages": [len(c) for c in conversations]}


def build_inputs(signature, prompts=None, ids=None, messages=None, system=None, **sampling):
    """Columnar inputs {name: list with a leading batch dim} for `signature`.

    chat takes `messages` (one conversation: [(role, content)], ending with a user turn)
    or `prompts` (each one user turn), after the `system` text if given.

    Sampling values left out (or None) get the client defaults in SAMPLING; all of them
    are always sent, so a request works whether or not the signature has defaults.
    """
    if signature not in SIGNATURES:
        raise ServingError(f"unknown signature {signature!r}: use one of "
                           f"{', '.join(SIGNATURES)}", BAD_INPUT)
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise ServingError(f"unknown sampling inputs {sorted(unknown)}: use "
                           f"{', '.join(SAMPLING)}", BAD_INPUT)
    if signature == "serving_default":
        if not prompts:
            raise ServingError("serving_default needs a prompt: pass --prompt=TEXT", BAD_INPUT)
        inputs = {"prompt": list(prompts)}
    elif signature == "chat":
        conversations = [list(messages)] if messages else [[("user", p)] for p in prompts or []]
        if system is not None:
            conversations = [[("system", system)] + c for c in conversations if c]
        if not conversations or not all(conversations):
            raise ServingError("chat needs messages: pass --message=user:TEXT (repeat for "
                               "turns; --system=TEXT first) or --prompt=TEXT", BAD_INPUT)
        inputs = chat_inputs(conversations)
    else:
        if not ids:
            raise ServingError(f"{signature} needs token ids: pass --ids=1,2,3", BAD_INPUT)
        width = max(len(row) for row in ids)  # right-pad with 0; `lengths` tells the truth
        inputs = {"input_ids": [list(row) + [0] * (width - len(row)) for row in ids],
                  "lengths": [len(row) for row in ids]}
    batch = len(next(iter(inputs.values())))
    if signature != "score":
        for name, default in SAMPLING.items():
            value = sampling.get(name)
            inputs[name] = [default if value is None else value] * batch
    return inputs


def _model_path(model, version=None, label=None):
    if version is not None:
        return f"{model}/versions/{int(version)}"
    return f"{model}/labels/{label}" if label else model


def predict_rest(inputs, signature="serving_default", host="127.0.0.1", port=8501,
                 model="deepseek", version=None, label=None, fmt="rows", timeout=30.0):
    """POST /v1/models/...:predict; returns columnar outputs {name: list}."""
    if fmt == "columnar":
        body = {"signature_name": signature, "inputs": inputs}
    else:
        batch = len(next(iter(inputs.values())))
        body = {"signature_name": signature,
                "instances": [{k: v[i] for k, v in inputs.items()} for i in range(batch)]}
    where = f"REST {host}:{port}"
    url = f"http://{host}:{port}/v1/models/{_model_path(model, version, label)}:predict"
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            pass
        if e.code == 404:
            hint = "check --model/--version/--label against the server's models.config"
        elif 400 <= e.code < 500:
            hint = "change the request as the message says"
        else:
            hint = "see the server log"
        raise ServingError(f"{where} answered HTTP {e.code}: {one_line(text)} ({hint})",
                           BAD_INPUT if 400 <= e.code < 500 else SERVER_ERROR) from None
    except (TimeoutError, socket.timeout):
        raise _timeout(where, timeout) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise _timeout(where, timeout) from None
        raise _unreachable(where, getattr(e.reason, "strerror", None) or e.reason) from None
    except (http.client.HTTPException, OSError) as e:
        raise _unreachable(where, e) from None
    except ValueError as e:
        raise ServingError(f"{where} sent a reply that is not JSON ({e}): is this TF Serving's "
                           "REST port?", SERVER_ERROR) from None
    if "outputs" in reply:  # columnar; a single output comes back bare
        out = reply["outputs"]
        out = out if isinstance(out, dict) else {"output": out}
        return {name: _plain(value) for name, value in out.items()}
    preds = reply.get("predictions", [])
    if preds and isinstance(preds[0], dict):  # rows with several outputs: one dict per row
        return {name: _plain([row[name] for row in preds]) for name in preds[0]}
    return {"output": _plain(preds)}


def _timeout(where, timeout):
    return ServingError(f"{where} did not answer within {timeout} s: the server is busy or "
                        "stuck; retry later or raise --timeout", UNREACHABLE)


def _unreachable(where, reason):
    return ServingError(f"cannot reach TF Serving {where} ({reason}): start the server "
                        "(serving/Dockerfile) or fix --host and the port", UNREACHABLE)


_GRPC_CODES = {"INVALID_ARGUMENT": (BAD_INPUT, "change the request as the message says"),
               "FAILED_PRECONDITION": (BAD_INPUT, "check --signature"),
               "NOT_FOUND": (BAD_INPUT, "check --model/--version/--label against the "
                                        "server's models.config"),
               "UNAVAILABLE": (UNREACHABLE, "start the server (serving/Dockerfile) or fix "
                                            "--host/--grpc_port"),
               "DEADLINE_EXCEEDED": (UNREACHABLE, "the server is busy or stuck; retry later "
                                                  "or raise --timeout")}


def predict_grpc(inputs, signature="serving_default", host="127.0.0.1", port=8500,
                 model="deepseek", version=None, label=None, timeout=30.0):
    """PredictionService.Predict; returns columnar outputs {name: list}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep stderr to our one line
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    elif label:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        array = np.asarray(value, dtype=_NP_DTYPES.get(name, "int32"))
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            reply = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code().name
            exit_code, hint = _GRPC_CODES.get(code, (SERVER_ERROR, "see the server log"))
            raise ServingError(f"gRPC {host}:{port} answered {code}: {one_line(e.details())} "
                               f"({hint})", exit_code) from None
    return {name: _plain(tf.make_ndarray(t).tolist()) for name, t in reply.outputs.items()}


def _plain(value):
    """Nested lists with strings decoded (TensorProto bytes, REST {"b64": ...})."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        value = base64.b64decode(value["b64"])
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def predict(inputs, protocol="rest", **kwargs):
    """predict_rest or predict_grpc; kwargs as theirs (port=None picks 8501 / 8500)."""
    if kwargs.get("port") is None:
        kwargs["port"] = 8500 if protocol == "grpc" else 8501
    if protocol == "grpc":
        kwargs.pop("fmt", None)
        return predict_grpc(inputs, **kwargs)
    return predict_rest(inputs, **kwargs)


def render(signature, inputs, outputs, as_json=False):
    """What the CLI prints: texts, ids rows, or 'total<TAB>per-token log-probs' per row."""
    if as_json:
        return json.dumps(outputs, ensure_ascii=False)
    if signature == "serving_default":
        return "\n".join(outputs["text"])
    if signature == "chat":
        return "\n".join(outputs["reply"])
    if signature == "generate_ids":
        return "\n".join(",".join(map(str, ids[:n])) for ids, n in
                         zip(outputs["output_ids"], outputs["output_lengths"]))
    return "\n".join(f"{total:.4f}\t" + ",".join(f"{p:.4f}" for p in probs[:n]) for total, probs, n
                     in zip(outputs["total_log_prob"], outputs["log_probs"], inputs["lengths"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_HELP)
    p.add_argument("--prompt", action="append", help="text for serving_default (or chat: one "
                   "user turn); repeat for a batch")
    p.add_argument("--message", action="append", help="chat: one message ROLE:TEXT (roles "
                   "user, assistant, tool); repeat in order, ending with a user turn")
    p.add_argument("--system", help="chat: the system message")
    p.add_argument("--ids", help="token ids for generate_ids/score, e.g. 1,2,3 (';' between rows)")
    p.add_argument("--signature", default="serving_default", choices=SIGNATURES)
    p.add_argument("--no_xla", action="store_true", help="call the generating signature's "
                   "<name>_no_xla twin (an export with XLA decoding, served by a model server "
                   "without --xla_cpu_compilation_enabled)")
    p.add_argument("--protocol", default="rest", choices=("rest", "grpc"))
    p.add_argument("--format", default="rows", choices=("rows", "columnar"),
                   help="REST body: 'instances' rows or 'inputs' columns")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--rest_port", type=int, default=8501)
    p.add_argument("--grpc_port", type=int, default=8500)
    p.add_argument("--model", default="deepseek")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="model version (default: the server's latest)")
    which.add_argument("--label", help="version label, e.g. stable or canary")
    for name, default in SAMPLING.items():
        p.add_argument(f"--{name}", type=type(default), default=None,
                       help=f"default {default}" + (" (<=0: greedy)" if name == "temperature"
                                                    else " (0: off)" if name == "top_k"
                                                    else " (1: off)" if name == "top_p"
                                                    else " (a fresh seed per request)"
                                                    if name == "seed" else ""))
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print all outputs as JSON")
    args = p.parse_args(argv)
    try:
        ids = parse_ids(args.ids) if args.ids else None
        messages = [parse_message(m) for m in args.message or []]
        inputs = build_inputs(args.signature, prompts=args.prompt, ids=ids, messages=messages,
                              system=args.system, **{k: getattr(args, k) for k in SAMPLING})
        name = args.signature + ("_no_xla" if args.no_xla and args.signature != "score" else "")
        outputs = predict(inputs, protocol=args.protocol, signature=name,
                          host=args.host, model=args.model, version=args.version,
                          label=args.label, timeout=args.timeout, fmt=args.format,
                          port=args.grpc_port if args.protocol == "grpc" else args.rest_port)
        print(render(args.signature, inputs, outputs, args.json))
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyError as e:
        print(f"error: the server's reply has no output {e}: is the model exported with the "
              f"deepseek_tf signature contract?", file=sys.stderr)
        return SERVER_ERROR
    return OK


if __name__ == "__main__":
    sys.exit(main())
