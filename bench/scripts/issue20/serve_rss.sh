#!/usr/bin/env bash
# The server's RSS after 100 and after 1000 requests (built-in model, concurrency 8, continuous batching): issue 20's
# "RSS flat over 1000 requests". Loopback only; the server is stopped with SIGTERM at the end.
set -u
PORT=${PORT:-8124}; LOG=$(mktemp)
edgediff serve --port "$PORT" > "$LOG" 2>&1 & SP=$!
for _ in $(seq 60); do grep -q "ready on" "$LOG" && break; sleep 1; done
edgediff bench serve "http://127.0.0.1:$PORT" --concurrency 8 --requests 100 | head -2
echo "after 100: $(ps -o rss= -p $SP) KB"
edgediff bench serve "http://127.0.0.1:$PORT" --concurrency 8 --requests 900 | head -2
echo "after 1000: $(ps -o rss= -p $SP) KB"
kill -TERM $SP; wait $SP; rm -f "$LOG"
