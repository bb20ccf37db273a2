#!/usr/bin/env bash
# Smoke test of the real TF Serving image (needs a docker daemon; the pytest suite uses
# in-process stand-ins instead). Builds the image with an exported model, starts it, waits
# until both versions are AVAILABLE, queries REST with curl and gRPC with client.py, checks a
# non-empty text comes back, and removes the container.
#   bash serving/smoke_test.sh /path/to/export/deepseek     # base dir with 1/ and 2/
# Env: PYTHON (default .venv/bin/python), REST_PORT (18501), GRPC_PORT (18500).
# Exit: 0 ok, 1 a check failed, 2 docker missing or bad arguments.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
MODEL_DIR="${1:-}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
REST_PORT="${REST_PORT:-18501}"
GRPC_PORT="${GRPC_PORT:-18500}"
IMAGE=deepseek-serving:smoke
NAME="deepseek-serving-smoke-$$"

if ! command -v docker >/dev/null 2>&1; then
  echo "error: docker is not installed; this smoke test needs docker (the pytest suite covers the client without it)" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: the docker daemon is not reachable (is it running, and may this user use it?)" >&2
  exit 2
fi
if [[ -z "$MODEL_DIR" || ! -f "$MODEL_DIR/1/saved_model.pb" || ! -f "$MODEL_DIR/2/saved_model.pb" ]]; then
  echo "error: pass the exported model base dir holding 1/saved_model.pb and 2/saved_model.pb" >&2
  exit 2
fi

cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== build $IMAGE"
docker build -q -t "$IMAGE" --build-context model="$MODEL_DIR" "$HERE"
echo "== run $NAME (gRPC :$GRPC_PORT, REST :$REST_PORT)"
docker run -d --name "$NAME" -p "$GRPC_PORT:8500" -p "$REST_PORT:8501" "$IMAGE" >/dev/null

echo "== wait for versions 1 and 2 to be AVAILABLE"
for i in $(seq 1 120); do
  status="$(curl -sf "http://127.0.0.1:$REST_PORT/v1/models/deepseek" || true)"
  if [[ "$(grep -o '"AVAILABLE"' <<<"$status" | wc -l)" -ge 2 ]]; then break; fi
  if [[ "$i" == 120 ]]; then
    echo "error: model not AVAILABLE after 120 s; server log:" >&2
    docker logs "$NAME" 2>&1 | tail -30 >&2
    exit 1
  fi
  sleep 1
done

echo "== REST (curl)"
body='{"signature_name": "serving_default", "instances": [{"prompt": "Hello", "max_new_tokens": 8,
       "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}]}'
reply="$(curl -sS --fail-with-body --max-time 120 -X POST "http://127.0.0.1:$REST_PORT/v1/models/deepseek/labels/stable:predict" -d "$body")"
echo "$reply"
"$PYTHON" -c 'import json,sys; t=json.load(sys.stdin)["predictions"][0]["text"]; sys.exit(0 if t else "error: empty text over REST")' <<<"$reply"

echo "== gRPC (client.py)"
text="$("$PYTHON" "$HERE/client.py" --protocol=grpc --grpc_port="$GRPC_PORT" --label=canary \
        --prompt=Hello --max_new_tokens=8 --timeout=120)"
echo "$text"
if [[ -z "$text" ]]; then echo "error: empty text over gRPC" >&2; exit 1; fi

curl -sf "http://127.0.0.1:$REST_PORT/monitoring/prometheus/metrics" | grep -q ':tensorflow:' \
  || { echo "error: no Prometheus metrics at /monitoring/prometheus/metrics" >&2; exit 1; }
echo "smoke test passed"
