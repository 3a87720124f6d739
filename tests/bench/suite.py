#!/usr/bin/env python3
"""Gatherer's benchmark suite (README, "Benchmarks"): one command that starts its own
servers on 127.0.0.1 and measures, side by side in one invocation, Gatherer
and its peers fetching the same URLs.

    python3 tests/bench/suite.py [--build build/release] [--n 20000] [--runs 3]
                                 [--cases nginx-25,nginx-256,https-256,h2-256,big-25,delay-25,...,routing]
                                 [--rows curl,aiohttp,python,embedded,tcp1,tcp2] [--delay-ms 50]
    python3 tests/bench/suite.py --quick      # smoke run: N=2000, 1 run, nginx-256 and delay-1000

Servers, both on 127.0.0.1 and started here:
  nginx   Debian's nginx from a private config in a temporary directory
          (never the system service): worker_processes 1, keep-alive with
          keepalive_requests 100000, access_log off, the same ~600-byte JSON
          on every path. stub_status counts its requests (the status reads
          themselves subtracted).
  delay   gatherer-bench-server --delay-ms D (one epoll thread, timer queue):
          answers every request after D ms (default 50), thousands of
          connections at once; GET /_stats/requests reads its count.

The case big-C fetches N/10 URLs whose body is a 1 MiB JSON on one line
(nginx's /big/ location), the size of a match record: it measures bodies
crossing every hop and the reorder buffer's bound in bytes (the client's
peak RSS). The case `routing` has no server: it runs broker-routing (a client, a tcp
gatherer-broker and one `gatherer-worker --echo`, no HTTP) once per round
over 15 x N statements with a window of 4096, and reports the rate that
statements cross client and broker, beside bare libcurl's nginx C=25 rate of
the same round: a broker must feed many workers, so it needs that headroom.

Rows (C = the case's concurrency):
  curl      curl-multi-baseline: one thread, C easy handles recycled,
            connections reused, each body written as soon as it is next in
            input order, then freed
  aiohttp   aiohttp_gather.py: asyncio.gather, one ClientSession,
            Semaphore(C), connector limit C (Debian's python3-aiohttp)
  python    python_gather.py: the Python package `gatherer` (built with
            the CMake option GATHERER_PYTHON, on in the release preset):
            `async with Gatherer(workers=C) as g`, `await g.gather()`,
            embedded; the same interpreter as the aiohttp row
  embedded  gatherer fetch --workers C (broker and worker in the process)
  tcp1      gatherer fetch --workers C --broker tcp://... with a
            gatherer-broker and 1 gatherer-worker process
  tcp2      the same with 2 worker processes

Each round runs every row once per case, the rows alternating (the first row
rotates from round to round) so that the noise of a shared machine falls on
all of them. Broker and workers are started fresh for every run, once the
broker logged every worker ready, and stopped with SIGTERM after it.

Every run is checked, and the suite stops with a message naming the case,
row and run otherwise: exit 0, N responses, all 200 with the server's body,
in input order where the output carries the index (gatherer; the peers store
each body at its input index), and the server counted exactly N requests for
the run (so no retries, no lost or extra requests).

Prints one markdown table: req/s median of the runs (min–max) from each
client process's wall time; ratio to bare libcurl (median of the per-round
ratios); CPU seconds (user+sys over every process of the row: the client,
and for tcp rows the broker and workers, their /proc/<pid>/stat before and
after the client ran); peak RSS summed over those processes (the client's
ru_maxrss measured by /usr/bin/time, so this script's own RSS, which Linux
carries across fork and exec, does not inflate it; VmHWM for broker and
workers); p50/p99 per-request latency (libcurl: per-transfer time; aiohttp:
per request; gatherer: the worker-side elapsed_ms of each output line). The
servers are never counted. For delay cases it also prints the ceiling C/delay
and each row's fraction of it, then which performance targets hold.

Needs nginx (with stub_status), python3-aiohttp and /usr/bin/time; when run
as root and one is missing it runs tests/bench/install-deps. Every wait has a
deadline, and every process started here is stopped on exit, failure or
Ctrl-C.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

ROWS = {
    "curl": "bare libcurl multi (1 thread)",
    "aiohttp": "aiohttp gather + Semaphore(C)",
    "python": "gatherer Python package, embedded",
    "embedded": "gatherer embedded",
    "tcp1": "gatherer, tcp broker + 1 worker",
    "tcp2": "gatherer, tcp broker + 2 workers",
}
DEFAULT_CASES = "nginx-25,nginx-256,https-256,h2-256,big-25,delay-25,delay-256,delay-1000,routing"
ROUTING_WINDOW = 4096
BIG_BODY_BYTES = 1 << 20
BIG_N_DIVISOR = 10  # the big case fetches N / 10 bodies of 1 MiB
ROUTING_PER_N = 15  # statements routed per request of the HTTP cases: a run of about the same length
NGINX_KINDS = ("nginx", "https", "h2", "big")
QUICK_CASES = "nginx-256,delay-1000"
NGINX_STATUS_PATH = "/nginx_status"
DELAY_STATS_PATH = "/_stats/requests"
# Deadlines for things that are quick when all is well.
START_TIMEOUT_S = 15
STOP_TIMEOUT_S = 15
HTTP_TIMEOUT_S = 10


class BenchFailure(Exception):
    """A check failed or a process misbehaved: the suite stops with this message."""


def log(msg):
    sys.stderr.write(f"[suite] {msg}\n")
    sys.stderr.flush()


def wait_for(pred, timeout_s, what):
    """Polls pred() until it is true; raises BenchFailure after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() >= deadline:
            if pred():
                return
            raise BenchFailure(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.002)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def http_get(url):
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        return r.status, r.read()


# --- processes ----------------------------------------------------------------


class Processes:
    """Every process this script starts, each in a session of its own (so a
    signal reaches its children too, and Ctrl-C in the terminal reaches only
    this script, which then stops them)."""

    def __init__(self):
        self.live = []

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.live.append(p)
        return p

    def wait(self, p, timeout_s, what):
        """Reaps p within timeout_s (SIGKILLs its group and raises otherwise);
        returns (exit code, rusage)."""
        fd = os.pidfd_open(p.pid)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(timeout_s * 1000):
                self.kill_group(p, signal.SIGKILL)
                os.wait4(p.pid, 0)
                p.returncode = -9
                self.live.remove(p)
                raise BenchFailure(f"{what} did not finish within {timeout_s:.0f} s (killed)")
        finally:
            os.close(fd)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.live.remove(p)
        return p.returncode, usage

    @staticmethod
    def kill_group(p, sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, procs, what):
        """SIGTERMs procs together, then waits for each; SIGKILL after the deadline."""
        procs = [p for p in procs if p in self.live]
        for p in procs:
            self.kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        late = []
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(p)
                self.kill_group(p, signal.SIGKILL)
                p.wait(timeout=STOP_TIMEOUT_S)
            self.live.remove(p)
        if late:
            raise BenchFailure(f"{what}: {len(late)} process(es) ignored SIGTERM for {STOP_TIMEOUT_S} s (killed)")

    def stop_all(self):
        for p in list(self.live):
            self.kill_group(p, signal.SIGTERM)
        for p in list(self.live):
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill_group(p, signal.SIGKILL)
                try:
                    p.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log(f"pid {p.pid} survived SIGKILL")
            self.live.remove(p)


def cpu_seconds(pid):
    """utime + stime of a running process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise BenchFailure(f"no VmHWM for pid {pid}")


def tail(path, chars=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


# --- servers ------------------------------------------------------------------


def big_json_body():
    """A JSON body of BIG_BODY_BYTES on one line: a match record's size."""
    body = '{"id":1,"frames":['
    item = '{"timestamp":1234567,"participant":7,"position":{"x":10234,"y":4321},"gold":15230},'
    while len(body) + len(item) + 2 <= BIG_BODY_BYTES:
        body += item
    return body[:-1] + "]}"


def json_body():
    """The ~600-byte JSON that both servers serve (the same shape as
    gatherer-bench-server's)."""
    body = '{"id":1,"name":"player","matches":['
    while len(body) < 580:
        body += '"EUW1-0123456789",'
    return body[:-1] + "]}"


NGINX_CONF = """\
# Private config for Gatherer's benchmark suite; every path is under -p.
worker_processes 1;
worker_rlimit_nofile 16384;
pid nginx.pid;
error_log error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    open_file_cache max=16 inactive=300s;
    open_file_cache_valid 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location = {status} {{
            stub_status;
        }}
        location /big/ {{
            default_type application/json;
            try_files /big.json =404;
        }}
        location / {{
            default_type application/json;
            try_files /player.json =404;
        }}
    }}
{tls_servers}}}
"""
# https: TLS 1.3 and HTTP/1.1 only; h2: TLS 1.3 offering HTTP/2 (ALPN).
NGINX_TLS_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl{http2} backlog=4096;
        ssl_certificate {dir}/server.pem;
        ssl_certificate_key {dir}/server.key;
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:bench:10m;
        http2_max_requests 1000000;
        root {root};
        location / {{
            default_type application/json;
            try_files /player.json =404;
        }}
    }}
"""


def make_certificates(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it (EC P-256),
    made with openssl for this run only; returns the CA's path."""
    d = directory
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = [
        ["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=gatherer-bench-ca",
         "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem"],
        ["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr"],
        ["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", f"{d}/server.ext", "-out", f"{d}/server.pem"],
    ]
    for step in steps:
        r = subprocess.run(step, capture_output=True, text=True, timeout=HTTP_TIMEOUT_S)
        if r.returncode != 0:
            raise BenchFailure(f"{' '.join(step[:3])}: {r.stderr.strip()[:500]}")
    return f"{d}/ca.pem"


class NginxServer:
    name = "nginx"

    def __init__(self, procs, nginx, workdir, tls=False):
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.dir, "www"))
        os.makedirs(os.path.join(self.dir, "tmp"))
        # nginx's worker drops root for an unprivileged user, who must reach the file.
        for d in (workdir, self.dir, os.path.join(self.dir, "www")):
            os.chmod(d, 0o755)
        self.body = json_body().encode()
        with open(os.path.join(self.dir, "www", "player.json"), "wb") as f:
            f.write(self.body)
        self.big_body = big_json_body().encode()
        with open(os.path.join(self.dir, "www", "big.json"), "wb") as f:
            f.write(self.big_body)
        self.port = free_port()
        # Plain http, and with tls https (HTTP/1.1) and h2 on ports of their own.
        self.ports = {"nginx": self.port}
        self.cacert = None
        tls_servers = ""
        if tls:
            self.cacert = make_certificates(self.dir)
            for kind, http2 in (("https", ""), ("h2", " http2")):
                self.ports[kind] = free_port()
                tls_servers += NGINX_TLS_SERVER.format(port=self.ports[kind], http2=http2, dir=self.dir,
                                                       root=os.path.join(self.dir, "www"))
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(port=self.port, root=os.path.join(self.dir, "www"), status=NGINX_STATUS_PATH,
                                      tls_servers=tls_servers))
        self.err = os.path.join(self.dir, "stderr.log")
        with open(self.err, "wb") as err:
            self.proc = procs.spawn([nginx, "-p", self.dir + "/", "-c", conf, "-e", "error.log", "-g", "daemon off;"],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)

        def ready():
            if self.proc.poll() is not None:
                raise BenchFailure(f"nginx exited with {self.proc.returncode}:\n{tail(self.err)}"
                                   f"{tail(os.path.join(self.dir, 'error.log'))}")
            return all(port_open(p) for p in self.ports.values())

        wait_for(ready, START_TIMEOUT_S, f"nginx on 127.0.0.1:{', '.join(map(str, self.ports.values()))}")
        self.status_reads = 0
        status, body = http_get(self.url("/players/probe"))
        if status != 200 or body != self.body:
            raise BenchFailure(f"nginx answers {status} {body[:200]!r}, not the JSON file")
        self.version = subprocess.run([nginx, "-v"], capture_output=True, text=True,
                                      timeout=HTTP_TIMEOUT_S).stderr.strip().split("/")[-1]

    def url(self, path, kind="nginx"):
        if kind == "big":
            return f"http://127.0.0.1:{self.port}/big{path}"
        scheme = "http" if kind == "nginx" else "https"
        return f"{scheme}://127.0.0.1:{self.ports[kind]}{path}"

    def counts(self):
        """(connections accepted, requests served) so far over every port, not
        counting the status reads (one connection and one request each)."""
        self.status_reads += 1
        status, text = http_get(self.url(NGINX_STATUS_PATH))
        # "Active connections: 1 \nserver accepts handled requests\n 5 5 12 \n..."
        m = re.search(rb"server accepts handled requests\s+(\d+)\s+\d+\s+(\d+)", text)
        if status != 200 or not m:
            raise BenchFailure(f"nginx stub_status unreadable: {status} {text[:200]!r}")
        return int(m.group(1)) - self.status_reads, int(m.group(2)) - self.status_reads

    def requests(self):
        return self.counts()[1]


class NginxEndpoint:
    """One of nginx's ports as a case's server: nginx (http), https (TLS 1.3,
    HTTP/1.1), h2 (TLS 1.3, HTTP/2) or big (http, the 1 MiB JSON)."""

    def __init__(self, nginx, kind):
        self.nginx = nginx
        self.kind = kind
        self.name = {"nginx": "nginx", "https": "nginx https", "h2": "nginx h2", "big": "nginx 1 MiB"}[kind]
        self.body = nginx.big_body if kind == "big" else nginx.body
        self.cacert = nginx.cacert if kind in ("https", "h2") else None

    def url(self, path):
        return self.nginx.url(path, self.kind)

    def counts(self):
        return self.nginx.counts()

    def requests(self):
        return self.nginx.requests()


class DelayServer:
    name = "delay"
    cacert = None

    def __init__(self, procs, binary, delay_ms, workdir):
        self.out = os.path.join(workdir, "delay-server.out")
        self.err = os.path.join(workdir, "delay-server.err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = procs.spawn([binary, "--delay-ms", str(delay_ms)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err)
        found = []

        def ready():
            if self.proc.poll() is not None:
                raise BenchFailure(f"gatherer-bench-server exited with {self.proc.returncode}:\n{tail(self.err)}")
            m = re.search(r"port (\d+)", tail(self.out))
            if m:
                found.append(int(m.group(1)))
            return bool(found)

        wait_for(ready, START_TIMEOUT_S, "gatherer-bench-server's port")
        self.port = found[0]
        status, self.body = http_get(self.url("/players/probe"))
        if status != 200 or not self.body.startswith(b'{"id":1'):
            raise BenchFailure(f"gatherer-bench-server answers {status} {self.body[:200]!r}")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def counts(self):
        """(connections: not counted here, requests)."""
        return None, self.requests()

    def requests(self):
        status, text = http_get(self.url(DELAY_STATS_PATH))
        if status != 200:
            raise BenchFailure(f"gatherer-bench-server {DELAY_STATS_PATH}: {status}")
        return int(text)


# --- rows -----------------------------------------------------------------------


def peer_summary(err_path):
    """Parses the "ok <n> failed <f> ... p50_ms <a> p99_ms <b>" line of the peers."""
    m = re.search(r"ok (\d+) failed (\d+) .*p50_ms ([\d.]+) p99_ms ([\d.]+)", tail(err_path))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))


def check_peer(out_path, err_path, n, body):
    """Bodies one a line in input order, all equal to the server's."""
    summary = peer_summary(err_path)
    if summary is None:
        raise BenchFailure(f"no summary line on stderr:\n{tail(err_path)}")
    ok, failed, p50, p99 = summary
    if ok != n or failed:
        raise BenchFailure(f"{ok} ok, {failed} failed of {n}:\n{tail(err_path)}")
    lines = 0
    with open(out_path, "rb") as f:
        for line in f:
            if line.rstrip(b"\n") != body:
                raise BenchFailure(f"body {lines} differs from the server's: {line[:200]!r}")
            lines += 1
    if lines != n:
        raise BenchFailure(f"{lines} bodies, expected {n}")
    return p50, p99


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def nearest_rank(sorted_samples, p):
    return sorted_samples[max(math.ceil(p * len(sorted_samples)), 1) - 1]


def check_gatherer(out_path, n, body):
    """JSON Lines: line i is index i, status 200, the server's body, no error."""
    text = body.decode()
    # For big bodies the line is matched, not parsed: the body as JSON
    # (ASCII, so escaped as json.dumps escapes it) and the error field.
    escaped = b'"body":' + json.dumps(text).encode()
    elapsed = []
    with open(out_path, "rb") as f:
        for i, line in enumerate(f):
            if not line.startswith(b'{"index":%d,"status":200,' % i):
                raise BenchFailure(f"line {i} is not index {i} with status 200: {line[:200]!r}")
            if len(line) < 65536:
                obj = json.loads(line)
                ok = obj.get("error") is None and obj.get("body") == text
                ms = obj.get("elapsed_ms")
            else:
                m = re.search(rb'"elapsed_ms":([0-9.]+)', line[:1024] + line[-1024:])
                rest = line.replace(escaped, b"", 1)
                ok = len(rest) < len(line) and (b'"error":' not in rest or b'"error":null' in rest)
                ms = m and float(m.group(1))
            if not ok or ms is None:
                raise BenchFailure(f"line {i} has an error or a wrong body: {line[:300]!r}")
            elapsed.append(float(ms))
    if len(elapsed) != n:
        raise BenchFailure(f"{len(elapsed)} lines, expected {n}")
    elapsed.sort()
    return nearest_rank(elapsed, 0.50), nearest_rank(elapsed, 0.99)


class Runner:
    def __init__(self, a, procs, workdir):
        self.a = a
        self.procs = procs
        self.workdir = workdir
        self.bin = {
            "curl": os.path.join(a.build, "tests/bench/curl-multi-baseline"),
            "gatherer": os.path.join(a.build, "client/gatherer"),
            "broker": os.path.join(a.build, "broker/gatherer-broker"),
            "worker": os.path.join(a.build, "worker/gatherer-worker"),
        }
        self.out = os.path.join(workdir, "row.out")
        self.err = os.path.join(workdir, "row.err")
        self.rusage = os.path.join(workdir, "row.rusage")

    def client(self, cmd, stdin_path, timeout_s, what):
        """Runs cmd under /usr/bin/time; returns (exit code, wall s, CPU s, peak RSS MB)."""
        full = ["/usr/bin/time", "-f", "%M", "-o", self.rusage] + cmd
        with open(stdin_path or os.devnull, "rb") as stdin, open(self.out, "wb") as out, \
                open(self.err, "wb") as err:
            start = time.monotonic()
            p = self.procs.spawn(full, stdin=stdin, stdout=out, stderr=err)
            code, usage = self.procs.wait(p, timeout_s, what)
            wall = time.monotonic() - start
        # time writes "Command exited with non-zero status N" before the figure.
        lines = tail(self.rusage).split()
        if not lines or not lines[-1].isdigit():
            raise BenchFailure(f"{what}: no peak RSS from /usr/bin/time ({lines!r})")
        # wait4 on time includes its reaped child: the client's CPU plus time's own few µs.
        return code, wall, usage.ru_utime + usage.ru_stime, int(lines[-1]) / 1024.0

    def routing(self, n, window):
        """One broker-routing run of n statements; returns its rate and the CPU of its three processes."""
        what = f"broker-routing, {n:,} statements, window {window}"
        cmd = [os.path.join(self.a.build, "tests/bench/broker-routing"), self.a.build, str(n), str(window), "1", "1"]
        code, _, cpu, _ = self.client(cmd, None, 60 + 4 * n / 100_000, what)
        with open(self.out, errors="replace") as f:
            m = re.search(r"median (\d+) statements/s", f.read())
        if code != 0 or not m:
            raise BenchFailure(f"{what}: exit {code}, no rate printed\n{tail(self.err)}")
        # broker-routing waits for its broker and worker: their CPU is in its children's.
        return {"rate": float(m.group(1)), "cpu": cpu, "conns": None}

    def cluster(self, workers):
        """A fresh broker and `workers` worker processes, every worker registered."""
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        broker_log = os.path.join(self.workdir, "broker.log")
        with open(broker_log, "wb") as err:
            broker = self.procs.spawn([self.bin["broker"], "--bind", endpoint, "--log-level", "info",
                                       "--drain-timeout-ms", "5000"],
                                      stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        started = [broker]
        for i in range(workers):
            with open(os.path.join(self.workdir, f"worker{i}.log"), "wb") as err:
                started.append(self.procs.spawn(
                    [self.bin["worker"], "--broker", endpoint, "--log-level", "warning", "--id", f"bench-{i}",
                     "--drain-timeout-ms", "5000"],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err))

        def ready():
            for p in started:
                if p.poll() is not None:
                    raise BenchFailure(f"broker or worker exited with {p.returncode}:\n{tail(broker_log)}")
            return tail(broker_log, 1 << 20).count(" ready with ") >= workers

        try:
            wait_for(ready, START_TIMEOUT_S, f"{workers} worker(s) ready at the broker")
        except BaseException:
            self.procs.stop(started, "broker and workers")
            raise
        return endpoint, started

    def run(self, row, c, server, url_file, timeout_s, n):
        """One run of one row over n URLs; returns its figures, or raises BenchFailure."""
        a = self.a
        what = f"{ROWS[row]} at C={c} on {server.name}"
        extra_cpu, extra_rss, cluster = 0.0, 0.0, []
        tls = ["--cacert", server.cacert] if server.cacert else []
        if row == "curl":
            cmd, stdin = [self.bin["curl"], "--concurrency", str(c), "--print"] + tls, url_file
        elif row == "aiohttp":
            cmd, stdin = [a.python, os.path.join(HERE, "aiohttp_gather.py"), url_file, "--concurrency", str(c),
                          "--print"] + tls, None
        elif row == "python":
            cmd, stdin = [a.python, os.path.join(HERE, "python_gather.py"), url_file, "--concurrency", str(c),
                          "--print", "--build", a.build] + tls, None
        else:
            cmd, stdin = [self.bin["gatherer"], "fetch", url_file, "--workers", str(c), "--log-level",
                          "warning"] + tls, None
            if row in ("tcp1", "tcp2"):
                endpoint, cluster = self.cluster(1 if row == "tcp1" else 2)
                cmd += ["--broker", endpoint]
        conns_before, before = server.counts()
        try:
            cpu_before = [cpu_seconds(p.pid) for p in cluster]
            try:
                code, wall, cpu, rss = self.client(cmd, stdin, timeout_s, what)
            except BenchFailure as e:
                raise BenchFailure(f"{e}; by then the server had counted {server.requests() - before} requests "
                                   f"and the client had written {count_lines(self.out)} lines") from None
            if cluster:
                extra_cpu = sum(cpu_seconds(p.pid) for p in cluster) - sum(cpu_before)
                extra_rss = sum(vm_hwm_mb(p.pid) for p in cluster)
        finally:
            if cluster:
                self.procs.stop(cluster, "broker and workers")
        if code != 0:
            raise BenchFailure(f"{what}: exit {code}\n{tail(self.err)}")
        if row in ("curl", "aiohttp", "python"):
            p50, p99 = check_peer(self.out, self.err, n, server.body)
        else:
            p50, p99 = check_gatherer(self.out, n, server.body)
        conns_after, after = server.counts()
        served = after - before
        if served != n:
            raise BenchFailure(f"{what}: the server counted {served} requests, expected exactly {n}")
        return {"n": n, "rate": n / wall, "wall": wall, "cpu": cpu + extra_cpu, "rss": rss + extra_rss, "client_rss": rss,
                "p50": p50, "p99": p99, "conns": None if conns_before is None else conns_after - conns_before}


# --- setup ------------------------------------------------------------------------


def nginx_binary():
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def missing_deps(a, need_nginx, need_aiohttp):
    missing = []
    if not os.access("/usr/bin/time", os.X_OK):
        missing.append("/usr/bin/time (Debian package time)")
    if need_nginx:
        nginx = nginx_binary()
        if nginx is None:
            missing.append("nginx")
        else:
            v = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=HTTP_TIMEOUT_S)
            if "http_stub_status_module" not in v.stderr:
                missing.append("nginx with the stub_status module")
            if shutil.which("openssl") is None:
                missing.append("openssl (the https cases' certificates)")
    if need_aiohttp:
        probe = subprocess.run([a.python, "-c", "import aiohttp"], capture_output=True, timeout=60)
        if probe.returncode != 0:
            missing.append(f"aiohttp for {a.python}")
    return missing


def ensure_deps(a, need_nginx, need_aiohttp):
    missing = missing_deps(a, need_nginx, need_aiohttp)
    if not missing:
        return
    script = os.path.join(HERE, "install-deps")
    if os.geteuid() != 0:
        sys.exit(f"missing: {', '.join(missing)}; run {script} as root")
    log(f"missing {', '.join(missing)}: running {script}")
    subprocess.run([script], check=True, timeout=1800)
    missing = missing_deps(a, need_nginx, need_aiohttp)
    if missing:
        sys.exit(f"still missing after {script}: {', '.join(missing)}")


def raise_fd_limit():
    """C=1000 needs about two descriptors per connection in client and server;
    children inherit the raised soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}"


def parse_cases(text):
    cases = []
    for item in text.split(","):
        if item.strip() == "routing":
            cases.append(("routing", ROUTING_WINDOW))
            continue
        m = re.fullmatch(r"(nginx|https|h2|big|delay)-(\d+)", item.strip())
        if not m or int(m.group(2)) < 1:
            sys.exit(f"--cases: '{item}' is not nginx-C, https-C, h2-C, big-C, delay-C or routing")
        cases.append((m.group(1), int(m.group(2))))
    return cases


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build/release"), help="release build directory")
    ap.add_argument("--n", type=int, default=None, help="requests per run (default 20000; --quick 2000)")
    ap.add_argument("--runs", type=int, default=None, help="rounds (default 3; --quick 1)")
    ap.add_argument("--cases", default=None, help=f"comma-separated nginx-C / https-C / h2-C / big-C / delay-C / routing (default {DEFAULT_CASES})")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--delay-ms", type=int, default=50, help="delay server's answer delay")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: N=2000, 1 run, all rows, {QUICK_CASES}")
    ap.add_argument("--run-timeout", type=float, default=None,
                    help="seconds one run may take (default 60 + 4x the run's ideal time)")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary directory (server, broker and worker logs, last outputs)")
    ap.add_argument("--python", default="/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK)
                    else sys.executable, help="interpreter for the aiohttp and python rows (Debian's python3-aiohttp)")
    a = ap.parse_args()
    a.n = a.n or (2000 if a.quick else 20000)
    a.runs = a.runs or (1 if a.quick else 3)
    a.cases = parse_cases(a.cases or (QUICK_CASES if a.quick else DEFAULT_CASES))
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in a.rows:
        if r not in ROWS:
            sys.exit(f"--rows: unknown row '{r}' (one of {', '.join(ROWS)})")
    if a.n < 1 or a.runs < 1 or a.delay_ms < 1:
        sys.exit("--n, --runs and --delay-ms must be >= 1")
    a.build = os.path.abspath(a.build)
    return a


# --- report -----------------------------------------------------------------------


def case_n(a, kind):
    """Requests per run of a case: N, or N / BIG_N_DIVISOR for 1 MiB bodies."""
    return max(1, a.n // BIG_N_DIVISOR) if kind == "big" else a.n


def ideal_rate(a, kind, c):
    return c * 1000.0 / a.delay_ms if kind == "delay" else None


def ratio_to(results, key, row, base):
    """Median over rounds of rate(row) / rate(base) within the same round."""
    pairs = [(r[row]["rate"], r[base]["rate"]) for r in results[key] if row in r and base in r]
    return statistics.median(x / y for x, y in pairs) if pairs else None


def report(a, results, nginx_version, started):
    med = statistics.median
    out = []
    out.append(f"Gatherer benchmark suite, {started:%Y-%m-%d %H:%M}, {machine()}; "
               f"N = {a.n:,} GETs of a ~600-byte JSON per run, {a.runs} run(s) per row, rows alternating "
               f"within each round; nginx {nginx_version or '-'} (worker_processes 1), delay server "
               f"gatherer-bench-server --delay-ms {a.delay_ms} (1 thread). Every run checked: N responses, "
               f"all 200 with the server's body, gatherer's in input order, the server counted exactly N.")
    out.append("")
    out.append("| case | row | req/s median (min–max) | × bare libcurl | % of C/delay | CPU s | CPU µs/req "
               "| peak RSS MB | connections | p50 ms | p99 ms |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"nginx": "nginx", "https": "nginx https (TLS 1.3, HTTP/1.1)", "h2": "nginx h2 (TLS 1.3, HTTP/2)",
              "big": f"nginx 1 MiB bodies (N/{BIG_N_DIVISOR})"}
    for kind, c in a.cases:
        if kind == "routing":
            continue
        key = (kind, c)
        ideal = ideal_rate(a, kind, c)
        label = (f"{labels[kind]} C={c}" if kind in labels
                 else f"delay {a.delay_ms} ms C={c} (C/delay {ideal:,.0f}/s)")
        for row in a.rows:
            runs = [r[row] for r in results[key] if row in r]
            if not runs:
                continue  # not measured for this case
            rates = [r["rate"] for r in runs]
            ratio = ratio_to(results, key, row, "curl") if "curl" in a.rows else None
            frac = f"{med(rates) / ideal:.0%}" if ideal else "—"
            cpu = med(r["cpu"] for r in runs)
            conns = [r["conns"] for r in runs if r["conns"] is not None]
            out.append(f"| {label} | {ROWS[row]} | {med(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | "
                       f"{'—' if ratio is None else f'{ratio:.2f}'} | {frac} | {cpu:.2f} | {cpu / runs[0]['n'] * 1e6:.0f} | "
                       f"{med(r['rss'] for r in runs):.1f} | {max(conns) if conns else '—'} | "
                       f"{med(r['p50'] for r in runs):.1f} | {med(r['p99'] for r in runs):.1f} |")
    out.append("")
    out.append("CPU s: user+sys of the client, plus broker and workers for tcp rows (servers not counted), and per "
               "request; peak RSS MB: summed over the same processes; connections: opened to nginx in the run "
               "(the most of the runs; every TLS connection is one handshake); p50/p99: per-transfer time for "
               "libcurl, per request for aiohttp, the worker-side elapsed_ms for gatherer and its Python package; all "
               "medians of the runs. aiohttp speaks HTTP/1.1 only, also in the h2 case.")
    out.append("")
    out.extend(routing_report(a, results))
    out.extend(targets(a, results))
    return "\n".join(out)


def routing_ratios(results):
    """Per-round routing rate / bare libcurl nginx C=25 rate of the same round."""
    routing, bare = results.get(("routing", ROUTING_WINDOW), []), results.get(("nginx", 25), [])
    return [r["routing"]["rate"] / b["curl"]["rate"] for r, b in zip(routing, bare) if "curl" in b]


def routing_report(a, results):
    runs = [r["routing"] for r in results.get(("routing", ROUTING_WINDOW), [])]
    if not runs:
        return []
    rates = [r["rate"] for r in runs]
    ratios = routing_ratios(results)
    med = statistics.median
    return [f"Broker routing: {ROUTING_PER_N * a.n:,} statements per run through a client, a tcp broker and one echo "
            f"worker (broker-routing, window {ROUTING_WINDOW}, no HTTP): {med(rates):,.0f} statements/s "
            f"({min(rates):,.0f}–{max(rates):,.0f}), CPU {med(r['cpu'] for r in runs) / (ROUTING_PER_N * a.n) * 1e6:.1f} "
            f"µs per statement over the three processes; "
            + (f"{med(ratios):.1f}× bare libcurl's nginx C=25 rate of the same rounds." if ratios
               else "run nginx-25 with the curl row for its ratio to bare libcurl."), ""]


def targets(a, results):
    """The throughput targets that this run can judge."""
    lines = ["Performance targets (this run):", ""]

    def verdict(ok):
        return "holds" if ok else "misses"

    def judged(r, bound, decimals):
        """r× and its verdict, with a decimal more where rounding would
        cross the bound (0.847 is not shown as a 0.85 that misses 0.85)."""
        while decimals < 4 and (round(r, decimals) >= bound) != (r >= bound):
            decimals += 1
        return f"{r:.{decimals}f}× — {verdict(r >= bound)}"

    key = ("nginx", 256)
    if key in results and "curl" in a.rows:
        if "embedded" in a.rows:
            r = ratio_to(results, key, "embedded", "curl")
            lines.append(f"- nginx C=256, embedded ≥ 0.85× bare libcurl: {judged(r, 0.85, 2)}")
        if "tcp1" in a.rows:
            r = ratio_to(results, key, "tcp1", "curl")
            lines.append(f"- nginx C=256, tcp broker + 1 worker ≥ 0.75× bare libcurl: {judged(r, 0.75, 2)}")
    if key in results and "embedded" in a.rows and "aiohttp" in a.rows:
        r = ratio_to(results, key, "embedded", "aiohttp")
        lines.append(f"- nginx C=256, embedded ≥ 6× aiohttp: {judged(r, 6, 1)}")
    if key in results and "python" in a.rows and "aiohttp" in a.rows:
        r = ratio_to(results, key, "python", "aiohttp")
        lines.append(f"- nginx C=256, Python package ≥ 5× aiohttp: {judged(r, 5, 1)}")
    for kind in ("https", "h2"):
        key = (kind, 256)
        if key not in results:
            continue
        for row in ("embedded", "tcp1"):
            if row in a.rows and "curl" in a.rows:
                r = ratio_to(results, key, row, "curl")
                lines.append(f"- {kind} C=256, {ROWS[row]} ≥ 0.9× bare libcurl: {judged(r, 0.9, 2)}")
            if row in a.rows and "aiohttp" in a.rows:
                r = ratio_to(results, key, row, "aiohttp")
                lines.append(f"- {kind} C=256, {ROWS[row]} ≥ 6× aiohttp: {judged(r, 6, 1)}")
    over = [f"{kind} C={c} {row}: {fig['conns']}" for (kind, c), rounds in results.items() for rnd in rounds
            for row, fig in rnd.items() if row not in ("curl", "aiohttp") and fig["conns"] is not None
            and fig["conns"] > c]
    if any(fig["conns"] is not None for rounds in results.values() for rnd in rounds for fig in rnd.values()):
        lines.append(f"- connections opened ≤ C (the window) in every gatherer run: "
                     f"{'holds' if not over else 'misses (' + '; '.join(over[:6]) + ')'}")
    key = ("delay", 1000)
    if key in results:
        ideal = ideal_rate(a, "delay", 1000)
        for row in ("embedded", "tcp1", "tcp2"):
            if row not in a.rows:
                continue
            # Which half applies (is the case CPU-bound here?) is for the reader:
            # both are printed.
            rate = statistics.median(r[row]["rate"] for r in results[key])
            text = f"{rate / ideal:.0%} of C/delay — {verdict(rate >= 0.9 * ideal)}"
            if "curl" in a.rows:
                ratio = ratio_to(results, key, row, "curl")
                text += f"; {judged(ratio, 1.0, 2).replace('×', '× bare libcurl', 1)}"
            lines.append(f"- delay C=1000, {ROWS[row]} ≥ 90% of C/delay, or ≥ bare libcurl where CPU-bound: {text}")
    key = ("big", 25)
    if key in results and "curl" in a.rows:
        for row, floor in (("embedded", 0.85), ("tcp1", 0.7)):
            if row in a.rows:
                r = ratio_to(results, key, row, "curl")
                rss = statistics.median(rnd[row]["client_rss"] for rnd in results[key])
                lines.append(f"- 1 MiB bodies C=25, {ROWS[row]} ≥ {floor}× bare libcurl: {judged(r, floor, 2)}; "
                             f"the client's peak RSS < 100 MB: {rss:.0f} MB — {verdict(rss < 100)}")
    ratios = routing_ratios(results)
    if ratios:
        r = statistics.median(ratios)
        lines.append(f"- broker routing ≥ 25× bare libcurl nginx C=25: {judged(r, 25, 1)}")
    if len(lines) == 2:
        lines.append("- none: run nginx-256 and delay-1000 with the curl and gatherer rows")
    return lines


# --- main -------------------------------------------------------------------------


def main():
    a = parse_args()
    kinds = {kind for kind, _ in a.cases}
    for name in ("curl-multi-baseline", "gatherer-bench-server"):
        if not os.access(os.path.join(a.build, "tests/bench", name), os.X_OK):
            sys.exit(f"{a.build} has no tests/bench/{name}: cmake --preset release && cmake --build --preset release")
    ensure_deps(a, bool(kinds & set(NGINX_KINDS)), "aiohttp" in a.rows)
    if "python" in a.rows and not os.path.isfile(os.path.join(a.build, "python/gatherer/__init__.py")):
        probe = subprocess.run([a.python, "-c", "import gatherer._gatherer"], capture_output=True, timeout=60)
        if probe.returncode != 0:
            sys.exit(f"the python row needs the package: {a.build}/python (cmake -DGATHERER_PYTHON=ON, on in the "
                     f"release preset) or `pip install .` for {a.python}")
    fds = raise_fd_limit()
    if fds < 4 * max(c for _, c in a.cases) + 256:
        log(f"warning: RLIMIT_NOFILE is {fds}; C={max(c for _, c in a.cases)} may run out of descriptors")

    # SIGTERM unwinds like Ctrl-C, through the finally that stops every child.
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="gatherer-bench-")
    started = datetime.datetime.now()
    try:
        servers = {}
        if kinds & set(NGINX_KINDS):
            nginx = NginxServer(procs, nginx_binary(), workdir, tls=bool(kinds & {"https", "h2"}))
            for kind in kinds & set(NGINX_KINDS):
                servers[kind] = NginxEndpoint(nginx, kind)
        if "delay" in kinds:
            servers["delay"] = DelayServer(procs, os.path.join(a.build, "tests/bench/gatherer-bench-server"),
                                           a.delay_ms, workdir)
        url_files = {}
        for kind, server in servers.items():
            path = os.path.join(workdir, f"urls-{kind}.txt")
            with open(path, "w") as f:
                f.writelines(f"{server.url(f'/players/{i}')}\n" for i in range(case_n(a, kind)))
            url_files[kind] = path
        runner = Runner(a, procs, workdir)
        results = {}
        for kind, c in a.cases:
            ideal = ideal_rate(a, kind, c) or 1000.0  # nginx, routing: any row faster than 1000 req/s
            timeout_s = a.run_timeout or 60 + 4 * case_n(a, kind) / ideal
            results[(kind, c)] = []
            for rnd in range(a.runs):
                if kind == "routing":
                    results[(kind, c)].append({"routing": runner.routing(a.n * ROUTING_PER_N, c)})
                    log(f"routing run {rnd + 1}/{a.runs}: {results[(kind, c)][-1]['routing']['rate']:,.0f} statements/s")
                    continue
                shift = rnd % len(a.rows)
                order = a.rows[shift:] + a.rows[:shift]
                figures = {}
                for row in order:
                    try:
                        figures[row] = runner.run(row, c, servers[kind], url_files[kind], timeout_s, case_n(a, kind))
                    except BenchFailure as e:
                        raise BenchFailure(f"{kind} C={c}, {ROWS[row]}, run {rnd + 1}: {e}") from None
                    log(f"{kind} C={c} run {rnd + 1}/{a.runs} {row}: {figures[row]['rate']:,.0f} req/s, "
                        f"CPU {figures[row]['cpu']:.2f} s, RSS {figures[row]['rss']:.1f} MB")
                results[(kind, c)].append(figures)
        nginx_version = next((s.nginx.version for s in servers.values() if isinstance(s, NginxEndpoint)), None)
        print(report(a, results, nginx_version, started))
    except BenchFailure as e:
        sys.exit(f"suite: FAILED: {e}")
    except KeyboardInterrupt:
        sys.exit("suite: interrupted; stopped every process it started")
    finally:
        procs.stop_all()
        if a.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
