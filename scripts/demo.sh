#!/usr/bin/env bash
# `make demo`: the whole road, offline, on the embedded defaults:
# demo data -> train (pretrained MobileNetV2, two-phase) -> export (verified ONNX) -> serve (gRPC + /metrics)
# -> classify every held-out test image over gRPC -> show metrics -> SIGTERM.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_OUT:-demo-out}
PORT=${DEMO_PORT:-50051}
METRICS_PORT=${DEMO_METRICS_PORT:-8080}
t0=$(date +%s)
step() { printf '\n\033[1m==> [%4ss] %s\033[0m\n' "$(( $(date +%s) - t0 ))" "$*"; }

rm -rf "$OUT"
step "materialise the embedded demo dataset (Fashion-MNIST subset) as an ImageFolder tree"
"$BIN/tlserve" demo-data "$OUT/data"

step "train: fine-tune pretrained MobileNetV2 (head first, then the whole network at a lower LR)"
"$BIN/tlserve" train --data "$OUT/data" --out "$OUT/run" --name fashion --image-size 64  # 28 px originals

step "export: one verified ONNX file with its manifest inside"
"$BIN/tlserve" export "$OUT/run" --repository "$OUT/models" --name fashion --version auto
ls -l "$OUT"/models/fashion/*/

step "serve on localhost:$PORT (metrics on :$METRICS_PORT)"
"$BIN/tlserve" serve --repository "$OUT/models" --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT

step "classify every held-out test image over gRPC"
"$BIN/tlserve" predict --target "127.0.0.1:$PORT" --images "$OUT/data/test" --wait-ready 120 --top-k 3 --show 5

step "a few lines of Prometheus /metrics"
"$BIN/python" - "$METRICS_PORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
keep = ("tlserve_requests_total", "tlserve_request_duration_seconds_count", "tlserve_request_duration_seconds_sum",
        "tlserve_batch_size_count", "tlserve_model_ready", "tlserve_model_info")
for line in text.splitlines():
    if line.startswith(keep):
        print(line)
PY

step "stop the server with SIGTERM"
kill -TERM "$SERVER"
wait "$SERVER" && echo "server exited cleanly" || echo "server exited with status $?"
trap - EXIT
tail -n 3 "$OUT/server.log"
step "demo finished in $(( $(date +%s) - t0 )) s; run dir: $OUT/run (report, curves), model: $OUT/models/fashion"
