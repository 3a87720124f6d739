#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine (as root): install,
# build, start the example API on 127.0.0.1, gather 1,000 statements from it
# with the embedded default (no broker to set up), and print what came back;
# then crawl the example game API as the original's docs do (league ->
# summoners -> matches: one Gatherer, three gather() calls, within the API's
# rate limits, scaled down to 50 requests a second so the demo takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
cmake --preset release >/dev/null
cmake --build --preset release --target gatherer league-crawl

port=${PORT:-8089}
python3 examples/api_server.py --port "$port" &
api=$!
trap 'kill $api 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/players/1" >/dev/null && break; sleep 0.1; done

input=$(mktemp)
output=$(mktemp)
{
  for i in $(seq 1 500); do echo "http://127.0.0.1:$port/players/$i"; done
  for i in $(seq 1 490); do echo "{\"url\": \"http://127.0.0.1:$port/players/$i/matches\", \"headers\": {\"Accept\": \"application/json\"}}"; done
  for i in $(seq 1 10); do echo "http://127.0.0.1:$port/flaky/$((i * 5))"; done
} >"$input"

echo "gathering $(wc -l <"$input") statements with the embedded broker and worker..."
start=$(date +%s.%N)
set +e
./build/release/client/gatherer fetch --workers 25 "$input" >"$output"
status=$?
set -e
end=$(date +%s.%N)

python3 - "$output" "$start" "$end" "$status" <<'PY'
import json, sys
path, start, end, status = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lines = [json.loads(l) for l in open(path)]
ok = sum(1 for r in lines if r["error"] is None)
in_order = all(r["index"] == i for i, r in enumerate(lines))
retried = sum(1 for r in lines if r["attempts"] > 1)
print(f"{len(lines)} responses in {end - start:.2f} s, {ok} ok, in input order: {in_order}, "
      f"{retried} retried after 429 + Retry-After, exit status {status}")
for r in (lines[0], lines[500], lines[-1]):
    print(f"  #{r['index']}: HTTP {r['status']} {r['body'][:70]}")
sys.exit(0 if status == 0 and in_order and ok == len(lines) else 1)
PY

crawl_port=${CRAWL_PORT:-8090}
python3 examples/api_server.py --port "$crawl_port" --app-limit 50:1,1000:120 --league-size 60 >/dev/null 2>&1 &
crawl_api=$!
trap 'kill $api $crawl_api 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$crawl_port/_stats" >/dev/null && break; sleep 0.1; done
echo "crawling the example game API (league -> summoners -> matches) within its limits, 50 requests/s..."
./build/release/examples/league-crawl "http://127.0.0.1:$crawl_port" --rate-limit 50:1,1000:120 --matches 3
curl -fs "http://127.0.0.1:$crawl_port/_stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("example game API: %d requests answered, %d refused with 429" % (s["requests"], s["throttled"]))
sys.exit(0 if s["throttled"] == 0 else 1)'
