#!/usr/bin/env python3
"""A small local JSON API for trying Gatherer: player profiles and match lists,
with a little latency and an occasional rate-limit answer, like the kind of
rate-limited JSON API Gatherer is made for.

    python3 examples/api_server.py --port 8089

GET /players/<id>          -> {"id": <id>, "name": "player-<id>", "level": ...}
GET /players/<id>/matches  -> {"player": <id>, "matches": [...]}
GET /flaky/<id>            -> 429 with Retry-After: 1 on every 5th first try, else 200
Anything else              -> 404
"""
import argparse
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_seen = set()
_seen_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real APIs do

    def _send(self, status, payload, extra=None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        time.sleep(random.uniform(0.001, 0.02))
        m = re.fullmatch(r"/players/(\d+)", self.path)
        if m:
            pid = int(m.group(1))
            return self._send(200, {"id": pid, "name": f"player-{pid}", "level": pid % 300})
        m = re.fullmatch(r"/players/(\d+)/matches", self.path)
        if m:
            pid = int(m.group(1))
            return self._send(200, {"player": pid, "matches": [f"M-{pid}-{i}" for i in range(5)]})
        m = re.fullmatch(r"/flaky/(\d+)", self.path)
        if m:
            key = int(m.group(1))
            with _seen_lock:
                first = key not in _seen
                _seen.add(key)
            if first and key % 5 == 0:
                return self._send(429, {"error": "rate limited"}, {"Retry-After": "1"})
            return self._send(200, {"id": key})
        return self._send(404, {"error": "not found", "path": self.path})

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    # The default listen backlog (5) drops connection bursts: a client opening
    # 25 connections at once would see SYN retries of a second each.
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"example API on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
