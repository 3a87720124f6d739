#!/usr/bin/env bash
# Runs league-crawl against the example API with short windows and checks
# that nothing failed and the API answered no 429.
set -euo pipefail
crawl=$1
server=$2
log=$(mktemp)
trap 'kill $api 2>/dev/null || true; rm -f "$log"' EXIT
python3 "$server" --port 0 --app-limit 40:1 --league-size 30 >"$log" 2>&1 &
api=$!
port=
for _ in $(seq 1 100); do
  port=$(sed -n 's|.*http://127.0.0.1:\([0-9]*\).*|\1|p' "$log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "the example API did not start"; cat "$log"; exit 1; }
"$crawl" "http://127.0.0.1:$port" --rate-limit 40:1 --matches 3
stats=$(curl -fs "http://127.0.0.1:$port/_stats")
echo "$stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("API: %d requests, %d throttled" % (s["requests"], s["throttled"]))
sys.exit(0 if s["throttled"] == 0 and s["requests"] == 61 else 1)'
