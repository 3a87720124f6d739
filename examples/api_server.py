#!/usr/bin/env python3
"""A local mock of a rate-limited game API, for trying Gatherer and for its
rate-limit tests (Python standard library only).

    python3 examples/api_server.py --port 8089
    python3 examples/api_server.py --port 0 --app-limit 10:0.5 --method-limit match=5:0.5

Game API (keys allow --app-limit per application, --method-limit per endpoint):
GET /lol/league/v4/challengerleagues/by-queue/<queue>  -> league: --league-size entries
GET /lol/summoner/v4/summoners/<summonerId>              -> summoner (id, puuid, level, ...)
GET /lol/match/v5/matches/by-puuid/<puuid>/ids?count=N   -> N match ids (default 5)
GET /lol/match/v5/matches/<matchId>                      -> a match (~20 KB of JSON)

Every game API response carries X-App-Rate-Limit, X-App-Rate-Limit-Count,
X-Method-Rate-Limit and X-Method-Rate-Limit-Count. A request over a limit is
answered 429 with Retry-After (whole seconds) and X-Rate-Limit-Type
(application or method) and is not counted. --fail-every N answers every Nth
admitted request 503, as an overloaded server does: it counts all the same. Windows are sliding: at most
`count` requests in any `seconds` span, the strictest reading of a limit.

GET /_stats   -> {"requests", "throttled", "by_method", "max_in_window"}: for
                 tests; max_in_window holds, per limit, the most requests
                 ever admitted within one window.
POST /_reset  -> clears the counters and windows.

The old demo endpoints stay: /players/<id>, /players/<id>/matches and
/flaky/<id> (429 with Retry-After: 1 on every 5th first try); no limits.
"""
import argparse
import bisect
import collections
import hashlib
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_windows(text):
    out = []
    for pair in text.split(","):
        count, seconds = pair.split(":")
        out.append((int(count), float(seconds)))
    return out


def format_windows(windows):
    return ",".join(f"{c}:{s:g}" for c, s in windows)


class Limiter:
    """Sliding-window logs per (scope, window); thread-safe."""

    def __init__(self, windows):
        self.windows = windows
        self.log = collections.deque()  # admitted request times
        self.max_in_window = [0] * len(windows)

    def count(self, now, seconds):
        return len(self.log) - bisect.bisect_right(self.log, now - seconds)

    def blocked_for(self, now):
        """Seconds until a request is allowed (0 = now)."""
        wait = 0.0
        for count, seconds in self.windows:
            if self.count(now, seconds) >= count:
                oldest = self.log[len(self.log) - count]
                wait = max(wait, oldest + seconds - now)
        return wait

    def admit(self, now):
        self.log.append(now)
        longest = max(s for _, s in self.windows)
        while self.log and self.log[0] < now - longest:
            self.log.popleft()
        for i, (_, seconds) in enumerate(self.windows):
            self.max_in_window[i] = max(self.max_in_window[i], self.count(now, seconds))

    def counts(self, now):
        return ",".join(f"{self.count(now, s)}:{s:g}" for _, s in self.windows)


METHODS = [
    ("league", re.compile(r"/lol/league/v4/challengerleagues/by-queue/(\w+)")),
    ("summoner", re.compile(r"/lol/summoner/v4/summoners/([\w-]+)")),
    ("match-ids", re.compile(r"/lol/match/v5/matches/by-puuid/([\w-]+)/ids")),
    ("match", re.compile(r"/lol/match/v5/matches/(\w+)")),
]


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        a = self.args
        self.app = Limiter(parse_windows(a.app_limit))
        self.methods = {name: Limiter(parse_windows(a.method_limits.get(name, a.default_method_limit)))
                        for name, _ in METHODS}
        self.requests = 0
        self.admitted = 0
        self.throttled = 0
        self.started = time.monotonic()
        self.log = []  # [ms since start (or reset), status] of game API requests
        self.by_method = collections.Counter()
        self.throttled_by_type = collections.Counter()

    def stats(self):
        with self.lock:
            return {
                "requests": self.requests,
                "throttled": self.throttled,
                "throttled_by_type": dict(self.throttled_by_type),
                "by_method": dict(self.by_method),
                "log": self.log if self.args.keep_log else [],
                "max_in_window": {
                    "application": {f"{c}:{s:g}": m for (c, s), m in zip(self.app.windows, self.app.max_in_window)},
                    **{name: {f"{c}:{s:g}": m for (c, s), m in zip(l.windows, l.max_in_window)}
                       for name, l in self.methods.items()},
                },
            }


def seeded(*parts):
    return random.Random(hashlib.sha1("/".join(map(str, parts)).encode()).digest())


TIERS = ["IRON", "BRONZE", "SILVER", "GOLD", "PLATINUM", "EMERALD", "DIAMOND", "MASTER"]
CHAMPIONS = ["Ahri", "Garen", "Lux", "Jinx", "Thresh", "LeeSin", "Yasuo", "Ezreal", "Leona", "Vi", "Ornn", "Zed"]


def summoner_id(i):
    return f"S{i:06d}-" + hashlib.sha1(f"s{i}".encode()).hexdigest()[:24]


def puuid_of(sid):
    return "P-" + hashlib.sha1(f"p{sid}".encode()).hexdigest()[:40]


def league(queue, size):
    r = seeded("league", queue)
    entries = [{
        "summonerId": summoner_id(i), "summonerName": f"player{i}", "leaguePoints": r.randint(900, 2400),
        "rank": "I", "wins": r.randint(100, 600), "losses": r.randint(100, 600), "veteran": r.random() < .3,
        "inactive": False, "freshBlood": r.random() < .1, "hotStreak": r.random() < .2,
    } for i in range(size)]
    return {"tier": "CHALLENGER", "leagueId": "L-" + queue, "queue": queue, "name": "Mock's Champions",
            "entries": entries}


def summoner(sid):
    r = seeded("summoner", sid)
    return {"id": sid, "accountId": "A-" + sid, "puuid": puuid_of(sid), "name": "player-" + sid[:7],
            "profileIconId": r.randint(1, 5000), "revisionDate": 1700000000000 + r.randint(0, 10**9),
            "summonerLevel": r.randint(30, 900)}


def match_ids(puuid, count):
    return [f"EUW1_{int(hashlib.sha1((puuid + str(i)).encode()).hexdigest()[:8], 16)}" for i in range(count)]


def match(mid):
    r = seeded("match", mid)
    participants = []
    for p in range(10):
        participants.append({
            "puuid": "P-" + hashlib.sha1(f"{mid}{p}".encode()).hexdigest()[:40], "participantId": p + 1,
            "teamId": 100 if p < 5 else 200, "championName": r.choice(CHAMPIONS), "kills": r.randint(0, 20),
            "deaths": r.randint(0, 15), "assists": r.randint(0, 25), "goldEarned": r.randint(5000, 20000),
            "totalDamageDealtToChampions": r.randint(5000, 60000), "visionScore": r.randint(5, 90),
            "items": [r.randint(1000, 7000) for _ in range(7)],
            "perks": {"styles": [{"style": r.randint(8000, 8500), "selections": [r.randint(8000, 9999)
                                                                                for _ in range(4)]}
                                 for _ in range(2)]},
            "challenges": {f"stat{k}": round(r.random() * 100, 3) for k in range(40)},
        })
    return {"metadata": {"matchId": mid, "participants": [p["puuid"] for p in participants]},
            "info": {"gameDuration": r.randint(900, 2700), "gameMode": "CLASSIC", "queueId": 420,
                     "tier": r.choice(TIERS), "participants": participants,
                     "teams": [{"teamId": t, "win": (t == 100) == (r.random() < .5)} for t in (100, 200)]}}


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real APIs do
        # Headers and body go out in separate writes: with Nagle on, the body
        # would wait for the client's delayed ACK (40 ms a response).
        disable_nagle_algorithm = True

        def _send(self, status, payload, extra=None):
            body = json.dumps(payload, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self.path == "/_reset":
                with state.lock:
                    state.reset()
                return self._send(200, {"reset": True})
            return self._send(404, {"error": "not found"})

        def do_GET(self):
            path, _, query = self.path.partition("?")
            if path == "/_stats":
                return self._send(200, state.stats())
            for name, pattern in METHODS:
                m = pattern.fullmatch(path)
                if m:
                    return self.game(name, m.group(1), query)
            return self.demo(path)

        def game(self, method, arg, query):
            with state.lock:
                now = time.monotonic()
                state.requests += 1
                app, lim = state.app, state.methods[method]
                app_wait, method_wait = app.blocked_for(now), lim.blocked_for(now)
                if app_wait > 0 or method_wait > 0:
                    kind = "application" if app_wait >= method_wait else "method"
                    state.throttled += 1
                    state.throttled_by_type[kind] += 1
                    wait = max(app_wait, method_wait)
                    headers = self.limit_headers(app, lim, now)
                    retry = state.args.retry_after if state.args.retry_after else max(1, int(wait + 0.999))
                    headers["Retry-After"] = str(retry)
                    headers["X-Rate-Limit-Type"] = kind
                    status = 429
                else:
                    app.admit(now)
                    lim.admit(now)
                    state.by_method[method] += 1
                    headers = self.limit_headers(app, lim, now)
                    state.admitted += 1
                    fail = state.args.fail_every
                    status = 503 if fail and state.admitted % fail == 0 else 200
                if state.args.keep_log and len(state.log) < 100000:
                    state.log.append([round((now - state.started) * 1000, 3), status])
            if state.args.latency_ms > 0:
                time.sleep(random.uniform(0, state.args.latency_ms) / 1000)
            if status == 429:
                return self._send(429, {"status": {"message": "Rate limit exceeded", "status_code": 429}}, headers)
            if status == 503:
                return self._send(503, {"status": {"message": "Service unavailable", "status_code": 503}}, headers)
            if method == "league":
                payload = league(arg, state.args.league_size)
            elif method == "summoner":
                payload = summoner(arg)
            elif method == "match-ids":
                m = re.search(r"(?:^|&)count=(\d+)", query)
                payload = match_ids(arg, min(100, int(m.group(1))) if m else 5)
            else:
                payload = match(arg)
            return self._send(200, payload, headers)

        @staticmethod
        def limit_headers(app, lim, now):
            return {"X-App-Rate-Limit": format_windows(app.windows), "X-App-Rate-Limit-Count": app.counts(now),
                    "X-Method-Rate-Limit": format_windows(lim.windows),
                    "X-Method-Rate-Limit-Count": lim.counts(now)}

        def demo(self, path):
            time.sleep(random.uniform(0.001, 0.02))
            m = re.fullmatch(r"/players/(\d+)", path)
            if m:
                pid = int(m.group(1))
                return self._send(200, {"id": pid, "name": f"player-{pid}", "level": pid % 300})
            m = re.fullmatch(r"/players/(\d+)/matches", path)
            if m:
                pid = int(m.group(1))
                return self._send(200, {"player": pid, "matches": [f"M-{pid}-{i}" for i in range(5)]})
            m = re.fullmatch(r"/flaky/(\d+)", path)
            if m:
                key = int(m.group(1))
                with state.lock:
                    first = key not in state.flaky_seen
                    state.flaky_seen.add(key)
                if first and key % 5 == 0:
                    return self._send(429, {"error": "rate limited"}, {"Retry-After": "1"})
                return self._send(200, {"id": key})
            return self._send(404, {"error": "not found", "path": path})

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8089, help="0 = any free port (printed)")
    parser.add_argument("--app-limit", default="20:1,100:120", help="application limit, count:seconds,...")
    parser.add_argument("--method-limit", action="append", default=[], metavar="NAME=WINDOWS",
                        help="per-endpoint limit: league, summoner, match-ids or match (repeatable)")
    parser.add_argument("--default-method-limit", default="2000:10")
    parser.add_argument("--league-size", type=int, default=300)
    parser.add_argument("--retry-after", type=int, default=0, help="fixed Retry-After seconds on a 429 "
                        "(default: until the window allows)")
    parser.add_argument("--fail-every", type=int, default=0, metavar="N",
                        help="answer every Nth admitted request 503 (it still counts against the limits)")
    parser.add_argument("--keep-log", action="store_true", help="list every game API request in /_stats")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="random latency up to this, per request")
    args = parser.parse_args()
    args.method_limits = {}
    for spec in args.method_limit:
        name, _, windows = spec.partition("=")
        if name not in dict(METHODS) and name not in [n for n, _ in METHODS]:
            parser.error(f"unknown method {name}")
        args.method_limits[name] = windows
    state = State(args)
    state.flaky_seen = set()
    # The default listen backlog (5) drops connection bursts: a client opening
    # 25 connections at once would see SYN retries of a second each.
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    print(f"example API on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
