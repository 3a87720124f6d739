"""Fixtures of the Python package's tests: a small game API on 127.0.0.1 (league
-> entries -> summoners, the Pyot example's shape), Gatherer's own binaries
from the CMake build (GATHERER_BIN_DIR), and helpers that wait on conditions
with deadlines."""

import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

ENTRIES = 40  # entries in a league
HOLD_DEADLINE_S = 30  # /hold answers at the latest after this long


def bin_dir():
    d = os.environ.get("GATHERER_BIN_DIR") or os.path.join(REPO, "build", "release")
    if not os.path.isfile(os.path.join(d, "broker", "gatherer-broker")):
        pytest.fail(f"no Gatherer build in {d} (set GATHERER_BIN_DIR)")
    return d


def summoner(sid):
    return {"id": sid, "name": f"Summoner {sid}", "level": 30 + int(sid.split("-")[-1]) % 500}


class Api(BaseHTTPRequestHandler):
    """GET /league/<tier> (entries with summonerId), GET /summoner/<id>,
    GET /status/<code>, GET /n/<i> (body "<i>"), any method on /echo (the
    request as JSON), GET /hold (answers once the test releases it)."""

    protocol_version = "HTTP/1.1"
    server_version = "GathererTestApi/1"
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle and
    # delayed ACKs hold each keep-alive response back ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type="application/json", headers=()):
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled statement)
            self.close_connection = True

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path
        self.server.count += 1
        if path == "/echo":
            return self.reply(200, {"method": self.command, "headers": dict(self.headers.items()),
                                    "body": body.decode("latin-1")})
        m = re.fullmatch(r"/league/(\w+)", path)
        if m:
            entries = [{"summonerId": f"{m.group(1)}-{i}", "leaguePoints": i * 7} for i in range(ENTRIES)]
            return self.reply(200, {"tier": m.group(1), "entries": entries})
        m = re.fullmatch(r"/summoner/([\w-]+)", path)
        if m:
            return self.reply(200, summoner(m.group(1)))
        m = re.fullmatch(r"/status/(\d+)", path)
        if m:
            return self.reply(int(m.group(1)), f"status {m.group(1)}", "text/plain")
        m = re.fullmatch(r"/n/(\d+)", path)
        if m:
            return self.reply(200, m.group(1), "text/plain", [("X-Index", m.group(1)), ("Set-Cookie", "a=1"),
                                                              ("Set-Cookie", "b=2")])
        if path == "/hold":
            release = self.server.release
            with self.server.cond:
                self.server.held += 1
                self.server.cond.notify_all()
            release.wait(HOLD_DEADLINE_S)
            return self.reply(200, "released", "text/plain")
        return self.reply(404, "not found", "text/plain")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any


class ApiServer:
    """The Api on 127.0.0.1; over HTTPS with tls=(certificate file, key file)."""

    def __init__(self, tls=None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Api)
        self.scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.httpd.daemon_threads = True
        self.httpd.count = 0
        self.httpd.held = 0
        self.httpd.cond = threading.Condition()
        self.httpd.release = threading.Event()
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def wait_held(self, n, timeout_s):
        """Waits until n requests sit in /hold."""
        with self.httpd.cond:
            return self.httpd.cond.wait_for(lambda: self.httpd.held >= n, timeout_s)

    def release_held(self):
        """Answers every request waiting in /hold; later ones wait again."""
        event, self.httpd.release = self.httpd.release, threading.Event()
        event.set()

    def stop(self):
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def api():
    server = ApiServer()
    yield server
    server.stop()


class Proc:
    """A process whose output lines are collected by a thread, so it never
    blocks on a full pipe; wait_line() waits for a pattern with a deadline."""

    def __init__(self, cmd):
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.p.stdout:
            with self.cond:
                self.lines.append(raw.decode(errors="replace"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # end of output
            self.cond.notify_all()

    def wait_line(self, pattern, timeout_s=15, count=1):
        rx = re.compile(pattern)

        def found():
            hits = [m for m in (rx.search(line) for line in self.lines if line is not None) if m]
            if len(hits) >= count:
                return hits[count - 1]
            if self.lines and self.lines[-1] is None:
                raise AssertionError(f"{self.cmd[0]} exited ({self.p.poll()}):\n{''.join(l for l in self.lines if l)}")
            return None

        with self.cond:
            m = self.cond.wait_for(found, timeout_s)
        if not m:
            raise AssertionError(f"{self.cmd[0]}: no line matching {pattern!r} within {timeout_s} s:\n"
                                 f"{''.join(l for l in self.lines if l)[-3000:]}")
        return m

    def stop(self, timeout_s=15):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout_s)
        self.reader.join(timeout_s)
        return self.p.returncode


@pytest.fixture
def procs():
    started = []

    def spawn(cmd):
        p = Proc(cmd)
        started.append(p)
        return p

    yield spawn
    for p in reversed(started):
        p.stop()


@pytest.fixture
def bench_server(procs):
    """gatherer-bench-server (C++, epoll): a ~600-byte JSON on every path."""
    p = procs([os.path.join(bin_dir(), "tests", "bench", "gatherer-bench-server")])
    port = int(p.wait_line(r"port (\d+)").group(1))
    return f"http://127.0.0.1:{port}"


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_cluster(procs):
    """A gatherer-broker on tcp://127.0.0.1:<port> with one gatherer-worker."""
    d = bin_dir()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = procs([os.path.join(d, "broker", "gatherer-broker"), "--bind", endpoint, "--log-level", "debug"])
    worker = procs([os.path.join(d, "worker", "gatherer-worker"), "--broker", endpoint, "--io-threads", "1"])
    broker.wait_line(r" ready with ")
    return endpoint, broker, worker


def deadline(seconds):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end
