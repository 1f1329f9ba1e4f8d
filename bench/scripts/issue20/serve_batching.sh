#!/usr/bin/env bash
# Continuous batching vs one request at a time: the same server (built-in model) with and without --no-batching,
# loaded by `edgediff bench serve` at concurrency 8 (issue 20's batching figure). Loopback only.
set -u
PORT=${PORT:-8123}
for mode in "" "--no-batching"; do
  LOG=$(mktemp)
  edgediff serve --port "$PORT" $mode > "$LOG" 2>&1 & SP=$!
  for _ in $(seq 60); do grep -q "ready on" "$LOG" && break; sleep 1; done
  echo "== server ${mode:-(batching)}"
  edgediff bench serve "http://127.0.0.1:$PORT" --concurrency 8 --requests "${REQUESTS:-48}"
  kill -TERM $SP; wait $SP; rm -f "$LOG"
done
