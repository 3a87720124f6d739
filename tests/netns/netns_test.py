#!/usr/bin/python3
"""Multi-host network faults: broker, two workers, client and HTTP server each in
a Linux network namespace of its own, links cut and proxies killed mid-run.

    sudo /usr/bin/python3 tests/netns/netns_test.py --bin-dir build/release
    sudo /usr/bin/python3 tests/netns/netns_test.py --bin-dir build/release --case client-link --keep
    ctest --test-dir build/release -R netns_faults -V      # registered as netns_faults, label netns

The broker, worker and client binaries come from --bin-dir (copied at start,
so a rebuild during the run cannot swap them between cases), the HTTP server
is gatherer-bench-server --delay-ms 20 --bind <its address> --count-paths.

Topology (made fresh for every case, removed afterwards, also on failure or
Ctrl-C): a "hub" namespace holds a bridge; every other namespace (broker,
w1, w2, client, server, and proxy for the proxy cases) has one veth whose
peer is a port of that bridge. Addresses are 198.18.0.X/24, inside the
RFC 2544 benchmarking range 198.18.0.0/15; the bridge is not in the root
namespace and no namespace has a default route, so nothing can leave the
machine and no address outside what this test creates is ever used.

Cases (each over N statements, N = 20,000, or GATHERER_NETNS_N, or --n, but
N/2 for the cases whose outage holds the whole job back, which any N shows;
the fault is injected once the client has written 25% of its output lines):
  client-link   the client's link down 2 s, then up
  worker-link   worker w1's link down 2 s, then up
  broker-link   the broker's link down 2 s, then up
  worker-dead   w1's link down 1.2 s with --heartbeat-ms 200 on broker and
                workers (liveness 3 x 200 ms): w1 is presumed dead, its work
                runs again elsewhere, its late results are dropped; the one
                case over all N: the job must still run when the link returns
  client-proxy  client -> tcp_proxy.py -> broker; the proxy is SIGKILLed
                (every connection through it reset) and started again on
                the same port 0.3 s later
  worker-proxy  the same between w1 and the broker

Checks, per case: exactly N output lines, indices 0..N-1 in order; every GET
200 with the server's body; every POST 200, or (worker-dead only) failed with
kind "unknown"; the client's exit status agrees (0, or 1 when a statement
failed); the server saw every POST path at most once (exactly once when it
succeeded) and GET paths more than once only where re-dispatch is expected
(worker-dead, where at least one re-fetched GET or outcome-unknown POST is
required); broker, workers, server and proxy still running. A client that makes no
progress for --stall-timeout seconds, or is still running after --deadline
seconds, is killed and the case fails naming how many lines it wrote.

One "[figures]" line per case: wall time, time from the link (or proxy)
coming back until the client's output rate is again >= 80% of its rate before
the fault (output lines polled every 50 ms), re-fetched GETs.

Exit status: 0 all cases passed, 1 a case failed, 77 skipped (not root, no
`ip`, or the kernel refused namespaces, veth or bridges), 2 usage.
Standard library only; run with Debian's /usr/bin/python3.
"""

import argparse
import ctypes
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_SCRIPT = os.path.join(HERE, "tcp_proxy.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# Namespace names: gnetns-<pid of the test>-<random>-<role>. A namespace with
# this prefix whose test process is gone is a leftover of a crashed run and is
# removed at start; one whose test is still running belongs to a parallel run.
NS_PREFIX = "gnetns"
NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-([0-9a-f]+)-(\w+)$")

SUBNET = "198.18.0"  # /24 inside 198.18.0.0/15 (RFC 2544)
HOSTS = {"brk": 10, "w1": 21, "w2": 22, "cli": 30, "srv": 40, "prx": 50}
BROKER_PORT = 5555
PROXY_PORT = 6000

DEFAULT_N = 20000
SANITIZED_N = 5000
FAULT_AT = 0.25          # fraction of output lines written when the fault starts
LINK_DOWN_S = 2.0        # the deliberate outage
PROXY_GAP_S = 0.3        # proxy killed -> proxy started again
POLL_S = 0.05            # output line count sampling period
RECOVERED_FRACTION = 0.8
RATE_WINDOW_S = 0.25     # output rate after the fault is measured over this window
SERVER_DELAY_MS = 20
CLIENT_WINDOW = 200
START_TIMEOUT_S = 15     # a process to come up (port printed, listening, workers ready)
KILL_TIMEOUT_S = 5
IP_TIMEOUT_S = 10

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1


class Skip(Exception):
    pass


class CaseFailure(Exception):
    pass


class Interrupted(BaseException):
    pass


def log(msg):
    print(msg, flush=True)


def now():
    return time.monotonic()


def tail(path, lines=25):
    """The last lines of a log, runs of lines equal but for their timestamp collapsed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"    (cannot read {path}: {e})"
    runs = []  # [first line, key, repeats]
    for line in text.splitlines():
        key = re.sub(r"^\S+T\S+ ", "", line)
        if runs and runs[-1][1] == key:
            runs[-1][2] += 1
        else:
            runs.append([line, key, 1])
    out = [("    " + first[:400] + (f"  [x{k}]" if k > 1 else "")) for first, _, k in runs[-lines:]]
    return "\n".join(out) if out else "    (empty)"


# ---------------------------------------------------------------- namespaces

def ip(*args, check=True):
    """Runs `ip ARGS`; returns CompletedProcess. Raises RuntimeError on failure when check."""
    cmd = ["ip", *args]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {IP_TIMEOUT_S} s")
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def list_netns():
    r = ip("netns", "list", check=False)
    names = []
    for line in r.stdout.splitlines():
        if line.strip():
            names.append(line.split()[0])
    return names


def kill_pids_in_netns(name):
    r = ip("netns", "pids", name, check=False)
    for tok in r.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def delete_netns(name):
    kill_pids_in_netns(name)
    ip("netns", "delete", name, check=False)


def process_is_this_test(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"netns_test.py" in f.read()
    except OSError:
        return False


def remove_leftovers():
    """Deletes namespaces of earlier runs of this test that died without cleaning up."""
    removed = []
    for name in list_netns():
        m = NS_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and process_is_this_test(pid):
            continue  # a run in progress in parallel
        delete_netns(name)
        removed.append(name)
    if removed:
        log(f"removed {len(removed)} namespaces left by crashed runs: {', '.join(removed)}")


class Topology:
    """A hub namespace with a bridge and one namespace per role, each linked to it by a veth."""

    def __init__(self, tag, roles):
        self.tag = tag
        self.hub = f"{NS_PREFIX}-{os.getpid()}-{tag}-hub"
        self.ns = {role: f"{NS_PREFIX}-{os.getpid()}-{tag}-{role}" for role in roles}
        self.created = []

    def addr(self, role):
        return f"{SUBNET}.{HOSTS[role]}"

    def hub_port(self, role):
        return f"h-{role}"  # the bridge-side veth, in the hub namespace

    def _add_ns(self, name):
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def create(self):
        self._add_ns(self.hub)
        # STP is off by default, so a port forwards as soon as it is up
        # (also after `link set up` following a fault): no forward delay.
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for role, name in self.ns.items():
            self._add_ns(name)
            port = self.hub_port(role)
            ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", name, "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    # A link fault is cut on the bridge side: `ip link set h-ROLE down` in the
    # hub. The bridge stops forwarding to and from a disabled port, and the
    # namespace's own eth0 loses carrier (its veth peer is down), so its
    # transmissions are dropped too: no traffic in either direction, as when a
    # cable is pulled. Downing eth0 inside the namespace would instead delete
    # the namespace's connected route and make its sockets fail at once with
    # "network unreachable", which is not what a network outage looks like to
    # a host; from the bridge side the host keeps its address, route and
    # sockets and just hears nothing, and traffic resumes by TCP
    # retransmission (or ZeroMQ reconnection) when the port is up again.
    def link_down(self, role):
        ip("-n", self.hub, "link", "set", self.hub_port(role), "down")

    def link_up(self, role):
        ip("-n", self.hub, "link", "set", self.hub_port(role), "up")

    def destroy(self):
        for name in reversed(self.created):
            delete_netns(name)
        self.created = []


def check_privileges():
    if os.geteuid() != 0:
        raise Skip("needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to make network namespaces)")
    if shutil.which("ip") is None:
        raise Skip("`ip` (iproute2) not found")


def preflight(tag):
    """Raises Skip if this machine cannot give us namespaces, veths and a bridge."""
    topo = Topology(tag, ["brk"])
    try:
        topo.create()
        topo.link_down("brk")
        topo.link_up("brk")
    except RuntimeError as e:
        raise Skip(f"the kernel refused a namespace, veth or bridge: {e}")
    finally:
        topo.destroy()


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    # Children get SIGKILL if the test process dies (even by SIGKILL), so a
    # crashed run leaves no broker or worker behind; `ip netns exec` execs the
    # program, which keeps this setting.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Proc:
    def __init__(self, name, ns, argv, log_dir, stdout_path=None):
        self.name = name
        self.ns = ns
        self.argv = argv
        self.err_path = os.path.join(log_dir, f"{name}.log")
        self.out_path = stdout_path or os.path.join(log_dir, f"{name}.out")
        self.started = now()
        with open(self.out_path, "wb") as out, open(self.err_path, "ab") as err:
            self.popen = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, preexec_fn=_die_with_parent)

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def read_out(self):
        try:
            with open(self.out_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def read_err(self):
        try:
            with open(self.err_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def wait_for(predicate, timeout, what, watch=()):
    """Polls predicate every 20 ms until true; fails after timeout or if a watched process exits."""
    deadline = now() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in watch:
            if not p.alive():
                raise CaseFailure(f"{p.name} exited with {p.popen.returncode} while waiting for {what}")
        if now() > deadline:
            raise CaseFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def established_peers(pid, port):
    """Remote IPv4 addresses of established TCP connections to local `port` in pid's namespace."""
    peers = set()
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state != "01" or int(local.split(":")[1], 16) != port:
                    continue
                raw = bytes.fromhex(remote.split(":")[0])[::-1]  # little-endian on x86 and arm64
                peers.add(".".join(str(b) for b in raw))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return peers


def http_get_in_ns(ns, host, port, path, timeout=10):
    """GET http://host:port/path from inside namespace ns; returns the body as text."""
    code = ("import http.client,sys\n"
            f"c=http.client.HTTPConnection({host!r},{port},timeout={timeout})\n"
            f"c.request('GET',{path!r})\n"
            "r=c.getresponse()\n"
            "b=r.read()\n"
            "sys.stdout.write(b.decode())\n"
            "sys.exit(0 if r.status==200 else 1)\n")
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-c", code], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        raise CaseFailure(f"GET {path} from the server did not answer in {timeout + 5} s")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise CaseFailure(f"GET {path} from the server failed: {last[:300]}")
    return r.stdout


# ---------------------------------------------------------------- cases

class Case:
    def __init__(self, name, title, link=None, proxy=None, heartbeat_ms=None, redispatch=False,
                 down_s=LINK_DOWN_S, whole_n=False):
        self.name = name
        self.title = title
        # Statements: N for worker-dead, whose w2 runs on while w1 is away;
        # N/2 where the outage holds every statement back (the client's
        # window waits on the first unanswered one), so N only adds time.
        self.whole_n = whole_n
        self.link = link          # role whose link goes down
        self.down_s = down_s      # for how long
        self.proxy = proxy        # "cli" or "w1": that peer reaches the broker through the proxy
        self.heartbeat_ms = heartbeat_ms
        # Re-dispatch expected: the broker presumes a worker dead, so GETs may be
        # fetched again (at least one must be) and POSTs may fail as "unknown".
        self.redispatch = redispatch


CASES = [
    Case("client-link", "client's link down 2 s, then up", link="cli"),
    Case("worker-link", "worker w1's link down 2 s, then up", link="w1"),
    Case("broker-link", "broker's link down 2 s, then up", link="brk"),
    # 1.2 s: twice the liveness (3 x 200 ms) and past the ZeroMQ heartbeat
    # timeout, yet short enough that the link returns while the job still
    # runs (the other 75% take ~1.9 s at 20k), so w1's late results do meet
    # the broker, which must drop them.
    Case("worker-dead", "w1's link down 1.2 s > liveness 3 x 200 ms: presumed dead, work recovered",
         link="w1", heartbeat_ms=200, redispatch=True, down_s=1.2, whole_n=True),
    Case("client-proxy", "proxy between client and broker SIGKILLed, restarted 0.3 s later", proxy="cli"),
    Case("worker-proxy", "proxy between w1 and broker SIGKILLed, restarted 0.3 s later", proxy="w1"),
]


def make_input(path, n, server):
    """Every 10th statement (i % 10 == 9) is a POST with a small body; the rest GETs."""
    posts = set()
    with open(path, "w") as f:
        for i in range(n):
            if i % 10 == 9:
                posts.add(i)
                f.write(json.dumps({"method": "POST", "url": f"{server}/p/{i}", "body": "x"}) + "\n")
            else:
                f.write(json.dumps({"method": "GET", "url": f"{server}/s/{i}"}) + "\n")
    return posts


class LineCounter:
    """Counts complete lines of a file that another process appends to."""

    def __init__(self, path):
        self.path = path
        self.f = None
        self.lines = 0

    def poll(self):
        if self.f is None:
            try:
                self.f = open(self.path, "rb")
            except OSError:
                return self.lines
        while True:
            chunk = self.f.read(1 << 20)
            if not chunk:
                break
            self.lines += chunk.count(b"\n")
        return self.lines

    def close(self):
        if self.f:
            self.f.close()


def recovery_time(samples, t_fault, t_back, n):
    """(pre-fault rate in lines/s, recovery figure as text).

    The recovery figure is the time from t_back until the output rate over the
    next RATE_WINDOW_S is >= 80% of the pre-fault rate ("0.00s" if it never
    dropped), "done" if the job ended before t_back, or "never".
    """
    before = [s for s in samples if s[0] <= t_fault]
    end = before[-1]
    # The rate over the last second before the fault, from the first line if
    # that came later (the first wave, which opens every connection, is left
    # out when the fault comes late enough); with too short a span (small N),
    # from the client's start.
    start = next((s for s in before if s[0] >= end[0] - 1.0 and s[1] > 0), before[0])
    if end[0] - start[0] < 0.1:
        start = before[0]
    if end[0] - start[0] <= 0 or end[1] <= start[1]:
        return None, "n/a"
    rate = (end[1] - start[1]) / (end[0] - start[0])
    t_done = next((s[0] for s in samples if s[1] >= n), None)
    if t_done is not None and t_done <= t_back:
        return rate, "done"
    after = [s for s in samples if s[0] >= t_back]
    for i, (t, lines) in enumerate(after):
        if lines >= n:
            return rate, f"{t - t_back:.2f}s"
        j = next((k for k in range(i + 1, len(after)) if after[k][0] >= t + RATE_WINDOW_S), None)
        if j is None:
            # Not a full window left: recovered if the job ended within it.
            if after[-1][1] >= n:
                return rate, f"{t - t_back:.2f}s"
            break
        if (after[j][1] - lines) / (after[j][0] - t) >= RECOVERED_FRACTION * rate:
            return rate, f"{t - t_back:.2f}s"
    return rate, "never"


class Runner:
    def __init__(self, args, bins, origins, work_dir):
        self.a = args
        self.bins = bins          # the copies run
        self.origins = origins    # where they were copied from
        self.work_dir = work_dir
        self.client_has_broker_timeout = False
        self._unknown = set()
        self._by_worker = {}

    def probe_client(self):
        r = subprocess.run([self.bins["client"], "fetch", "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=10)
        self.client_has_broker_timeout = "--broker-timeout" in r.stdout

    def run_case(self, case, index):
        tag = f"{secrets.token_hex(2)}{index}"
        case_dir = os.path.join(self.work_dir, case.name)
        os.makedirs(case_dir, exist_ok=True)
        roles = ["brk", "w1", "w2", "cli", "srv"] + (["prx"] if case.proxy else [])
        topo = Topology(tag, roles)
        procs = {}
        result = {"name": case.name, "ok": False, "reason": "", "figures": ""}
        t0 = now()
        try:
            topo.create()
            self._run(case, topo, procs, case_dir, result)
            result["ok"] = True
        except (CaseFailure, RuntimeError, OSError) as e:
            result["reason"] = str(e)
        finally:
            for p in procs.values():
                p.kill()
            for p in procs.values():
                if p.wait(KILL_TIMEOUT_S) is None:
                    result["ok"] = False
                    result["reason"] += f"; {p.name} (pid {p.pid}) survived SIGKILL"
            topo.destroy()
        result["wall"] = now() - t0
        if not result["ok"]:
            result["tails"] = "\n".join(
                f"  --- {p.name} ({' '.join(os.path.basename(x) for x in p.argv[:1])}, "
                f"exit {p.popen.returncode}) {p.err_path}:\n{tail(p.err_path)}" for p in procs.values())
        return result

    def _run(self, case, topo, procs, case_dir, result):
        a = self.a
        n = a.n if case.whole_n else max(10, a.n // 2)
        hb = [] if case.heartbeat_ms is None else ["--heartbeat-ms", str(case.heartbeat_ms)]

        # HTTP server, in its own namespace on its 198.18 address.
        srv = procs["server"] = Proc("server", topo.ns["srv"],
                                     [self.bins["server"], "--delay-ms", str(SERVER_DELAY_MS), "--bind",
                                      topo.addr("srv"), "--count-paths"], case_dir)
        port = wait_for(lambda: (re.search(r"port (\d+)", srv.read_out()) or [None, None])[1],
                        START_TIMEOUT_S, "the HTTP server's port", [srv])
        server_url = f"http://{topo.addr('srv')}:{port}"
        try:
            http_get_in_ns(topo.ns["srv"], topo.addr("srv"), port, "/_stats/paths", timeout=5)
        except CaseFailure as e:
            raise CaseFailure(f"{self.origins['server']} does not serve /_stats/paths on {topo.addr('srv')}: "
                              f"built before --bind and --count-paths? ({e})")

        broker_ep = f"tcp://{topo.addr('brk')}:{BROKER_PORT}"
        brk = procs["broker"] = Proc("broker", topo.ns["brk"],
                                     [self.bins["broker"], "--bind", broker_ep, "--log-level", "info", *hb], case_dir)
        wait_for(lambda: "listening on" in brk.read_err(), START_TIMEOUT_S, "the broker to listen", [brk])

        proxy_ep = f"tcp://{topo.addr('prx')}:{PROXY_PORT}" if case.proxy else None
        proxy_argv = [PYTHON, PROXY_SCRIPT, "--listen", f"{topo.addr('prx')}:{PROXY_PORT}",
                      "--target", f"{topo.addr('brk')}:{BROKER_PORT}"]
        if case.proxy:
            px = procs["proxy"] = Proc("proxy", topo.ns["prx"], proxy_argv, case_dir)
            wait_for(lambda: "listening" in px.read_out(), START_TIMEOUT_S, "the proxy to listen", [px])

        for w in ("w1", "w2"):
            ep = proxy_ep if case.proxy == w else broker_ep
            procs[w] = Proc(w, topo.ns[w], [self.bins["worker"], "--broker", ep, "--id", w,
                                           "--log-level", "info", *hb], case_dir)
        # Both workers registered before the client starts, so both take part
        # before the fault: the broker logs "worker ID joined: ready ..."; should
        # that wording change, two established connections to the broker's
        # port from the workers' addresses (held 1 s) do as well.
        peers = {topo.addr("prx") if case.proxy == w else topo.addr(w) for w in ("w1", "w2")}
        t_wait = now()
        wait_for(lambda: all(re.search(rf"worker {w} joined: ready", brk.read_err()) for w in ("w1", "w2"))
                 or (now() - t_wait > 1.0 and peers <= established_peers(brk.pid, BROKER_PORT)),
                 START_TIMEOUT_S, "both workers to be ready at the broker", [brk, procs["w1"], procs["w2"]])

        input_path = os.path.join(case_dir, "input.jsonl")
        posts = make_input(input_path, n, server_url)
        out_path = os.path.join(case_dir, "out.jsonl")
        client_ep = proxy_ep if case.proxy == "cli" else broker_ep
        extra = ["--broker-timeout", "60"] if self.client_has_broker_timeout else []
        cli = procs["client"] = Proc("client", topo.ns["cli"],
                                     [self.bins["client"], "fetch", "--broker", client_ep, "--workers",
                                      str(CLIENT_WINDOW), "--log-level", "info", *extra, input_path], case_dir,
                                     stdout_path=out_path)

        # Poll the output every 50 ms; inject the fault at 25% of the lines.
        counter = LineCounter(out_path)
        samples = [(cli.started, 0)]
        trigger = max(1, math.ceil(n * FAULT_AT))
        phase = "before"
        t_fault = t_back = None
        t_up_due = None
        last_progress = cli.started
        hung = None
        try:
            while True:
                t = now()
                lines = counter.poll()
                if lines != samples[-1][1]:
                    last_progress = t
                samples.append((t, lines))
                if not cli.alive():
                    break
                if phase == "before" and lines >= trigger:
                    t_fault = now()
                    if case.link:
                        topo.link_down(case.link)
                        t_up_due = t_fault + case.down_s
                    else:
                        px = procs["proxy"]
                        px.kill(signal.SIGKILL)
                        if px.wait(KILL_TIMEOUT_S) is None:
                            raise CaseFailure(f"the proxy did not exit {KILL_TIMEOUT_S} s after SIGKILL")
                        t_up_due = t_fault + PROXY_GAP_S
                    phase = "down"
                elif phase == "down" and t >= t_up_due:
                    if case.link:
                        topo.link_up(case.link)
                    else:
                        px = procs["proxy"] = Proc("proxy", topo.ns["prx"], proxy_argv, case_dir)
                        wait_for(lambda: "listening" in px.read_out(), START_TIMEOUT_S,
                                 "the restarted proxy to listen", [px])
                    t_back = now()
                    phase = "after"
                elapsed = t - cli.started
                since = t - max(last_progress, t_back or 0)
                if phase != "down" and since > a.stall_timeout:
                    hung = f"no new output line for {since:.1f} s"
                elif elapsed > a.deadline:
                    hung = f"still running after the case deadline of {a.deadline:.0f} s"
                if hung:
                    cli.kill(signal.SIGKILL)
                    cli.wait(KILL_TIMEOUT_S)
                    break
                sleep_until = t + POLL_S
                if phase == "down":
                    sleep_until = min(sleep_until, t_up_due)
                time.sleep(max(0.0, sleep_until - now()))
            rc = cli.wait(KILL_TIMEOUT_S)
            lines = counter.poll()
            samples.append((now(), lines))
        finally:
            counter.close()
            if phase == "down":  # never leave the link down or the proxy dead for the checks below
                if case.link:
                    topo.link_up(case.link)
        t_end = samples[-1][0]
        # A broker, worker, server or proxy that crashed during the fault would be
        # hidden by the recovery it triggers: every one must still be running.
        crashed = [f"{p.name} exited with {p.popen.returncode}" for key, p in procs.items()
                   if key != "client" and not p.alive() and not (key == "proxy" and phase == "down")]

        rate, recovery = None, "n/a"
        if t_fault is not None:
            # t_back is None when the client ended during the outage ("done").
            rate, recovery = recovery_time(samples, t_fault, t_back or t_up_due, n)

        # What the server saw.
        # A consistent snapshot: the total before and after the per-path read
        # agree with it. A worker presumed dead may still have requests on
        # their way when the client ends (its transfers are aborted once it
        # registers again), so the reads are repeated until they agree.
        stats_ns = topo.ns["srv"]
        deadline = now() + 10

        def read_stats():
            before = int(http_get_in_ns(stats_ns, topo.addr("srv"), port, "/_stats/requests").strip() or "0")
            paths = {}
            for line in http_get_in_ns(stats_ns, topo.addr("srv"), port, "/_stats/paths").splitlines():
                parts = line.split(" ")
                if len(parts) == 3:
                    paths[(parts[0], parts[1])] = int(parts[2])
            after = int(http_get_in_ns(stats_ns, topo.addr("srv"), port, "/_stats/requests").strip() or "0")
            return before, paths, after

        served, per_path, again = read_stats()
        while not (served == again == sum(per_path.values())) and now() < deadline:
            served, per_path, again = read_stats()
        refetched = {k: c for k, c in per_path.items() if k[0] == "GET" and c > 1}
        extra_requests = sum(c - 1 for c in refetched.values())
        dead = re.findall(r"worker (\S+) presumed dead", brk.read_err())

        longest_stall = 0.0
        last_change = samples[0]
        for t, l in samples[1:]:
            if l != last_change[1]:
                longest_stall = max(longest_stall, t - last_change[0])
                last_change = (t, l)
        longest_stall = max(longest_stall, (t_end - last_change[0]) if lines < n else 0.0)

        def figures(unknown="-"):
            by_worker = ",".join(f"{w}:{c}" for w, c in sorted(self._by_worker.items())) or "-"
            return (f"[figures] case={case.name} wall={t_end - cli.started:.2f}s "
                    f"lines={lines}/{n} exit={rc} fault_at_line={trigger} "
                    f"fault_after={(t_fault - cli.started) if t_fault else float('nan'):.2f}s "
                    f"rate_before={rate or 0:.0f}/s "
                    f"recovery={recovery} "
                    f"refetched_gets={len(refetched)} extra_get_requests={extra_requests} "
                    f"unknown_posts={unknown} server_requests={served} presumed_dead={','.join(dead) or '-'} "
                    f"longest_output_stall={longest_stall:.2f}s by_worker={by_worker}")

        failures = list(crashed)
        unknown_posts = self.check_output(out_path, n, posts, case, None if hung else rc, failures)
        result["figures"] = figures(unknown_posts)
        if hung:
            partial = [f for f in failures if not f.startswith(f"{lines} output lines")]
            when = ("before the fault" if t_fault is None else
                    f"fault at +{t_fault - cli.started:.2f} s, back at "
                    + (f"+{t_back - cli.started:.2f} s" if t_back else "(never)"))
            raise CaseFailure(f"client hung: wrote {lines} of {n} lines, {hung} ({when}); "
                              f"killed at +{t_end - cli.started:.1f} s"
                              + (f"; in what it wrote: {'; '.join(partial)}" if partial else ""))
        if t_fault is None:
            raise CaseFailure(f"the client exited ({rc}) after {lines} of {n} lines, before the fault "
                              f"(at {trigger} lines) could be injected")
        self.check_server(per_path, served, n, posts, unknown_posts_idx=self._unknown, case=case,
                          failures=failures)
        if case.redispatch and not refetched and not self._unknown:
            failures.append(f"no GET was fetched again and no POST failed as unknown: w1 was not presumed "
                            f"dead, or held nothing (broker log presumed dead: {dead or 'none'})")
        if failures:
            raise CaseFailure("; ".join(failures))

    def check_output(self, out_path, n, posts, case, rc, failures):
        """Checks the client's output; returns how many POSTs failed as outcome unknown (allowed or not)."""
        self._unknown = set()
        self._by_worker = {}
        structural = []   # not JSON, wrong index
        failed = {}       # (method, status, error kind) -> [count, first indices, first message]
        body = None
        count = 0
        unknown_posts = 0
        with open(out_path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n") and rc is None:
                    break  # the killed client's half-written last line
                count += 1
                i = count - 1
                try:
                    r = json.loads(raw)
                except ValueError:
                    structural.append(f"line {count} is not JSON: {raw[:120]!r}")
                    continue
                if r.get("index") != i:
                    structural.append(f"line {count} has index {r.get('index')}, expected {i}")
                    continue
                err = r.get("error")
                w = r.get("worker") or "-"
                self._by_worker[w] = self._by_worker.get(w, 0) + 1
                status = r.get("status")
                method = "POST" if i in posts else "GET"
                if err is None and status == 200:
                    b = r.get("body")
                    if method == "POST":
                        continue
                    if body is None and b and len(b) >= 500 and '"name":"player"' in b:
                        body = b
                    if b == body:
                        continue
                    err = {"kind": "(body)", "message": f"not the server's body: {str(b)[:100]!r}"}
                kind = err.get("kind") if isinstance(err, dict) else None
                if method == "POST" and kind == "unknown":
                    unknown_posts += 1
                    if case.redispatch:
                        self._unknown.add(i)
                        continue
                entry = failed.setdefault((method, status, kind), [0, [], None])
                entry[0] += 1
                if len(entry[1]) < 5:
                    entry[1].append(i)
                if entry[2] is None:
                    message = err.get("message") if isinstance(err, dict) else err
                    entry[2] = f"{message} (worker {w}, attempts {r.get('attempts')})"
        if count != n:
            failures.append(f"{count} output lines, expected {n}")
        if structural:
            failures.append(f"{len(structural)} output lines out of place, first: " + " | ".join(structural[:5]))
        for (method, status, kind), (k, first, message) in sorted(failed.items(), key=lambda e: -e[1][0]):
            allowed = " (allowed only when a worker is presumed dead)" if (method, kind) == ("POST", "unknown") else ""
            failures.append(f"{k} {method}s failed with status {status} error {kind}{allowed}, e.g. "
                            f"indices {first}: {message}")
        expect_rc = 1 if self._unknown else 0
        if rc is not None and rc != expect_rc and not failed and not structural:
            failures.append(f"client exit status {rc}, expected {expect_rc} "
                            f"({len(self._unknown)} statements failed)")
        return unknown_posts

    def check_server(self, per_path, served, n, posts, unknown_posts_idx, case, failures):
        total = sum(per_path.values())
        if total != served:
            failures.append(f"server: /_stats/paths adds up to {total} requests, /_stats/requests says {served}")
        seen = set()
        post_dup, get_dup, strange = [], [], []
        for (method, target), count in per_path.items():
            m = re.fullmatch(r"/([sp])/(\d+)", target)
            i = int(m.group(2)) if m else -1
            if not m or i >= n or (m.group(1) == "p") != (i in posts) or method != (
                    "POST" if i in posts else "GET"):
                strange.append(f"{method} {target} x{count}")
                continue
            seen.add(i)
            if i in posts and count > 1:
                post_dup.append(f"{target} x{count}")
            if i not in posts and count > 1 and not case.redispatch:
                get_dup.append(f"{target} x{count}")
        missing = [i for i in range(n) if i not in seen and i not in unknown_posts_idx]
        if strange:
            failures.append(f"server saw {len(strange)} unexpected requests, e.g. {strange[:5]}")
        if post_dup:
            failures.append(f"{len(post_dup)} POSTs reached the server more than once, e.g. {post_dup[:5]}")
        if get_dup:
            failures.append(f"{len(get_dup)} GETs were fetched more than once where no worker should be "
                            f"presumed dead, e.g. {get_dup[:5]}")
        if missing:
            failures.append(f"{len(missing)} statements reported done never reached the server, "
                            f"e.g. {missing[:5]}")


# ---------------------------------------------------------------- main

def find_binaries(bin_dir, server_override):
    rel = {"broker": "broker/gatherer-broker", "worker": "worker/gatherer-worker", "client": "client/gatherer",
           "server": "tests/bench/gatherer-bench-server"}
    found = {}
    for key, path in rel.items():
        p = os.path.join(bin_dir, path)
        if key == "server" and server_override:
            p = server_override
        if not os.access(p, os.X_OK):
            raise CaseFailure(f"binary not found: {p} (build the project first)")
        found[key] = p
    return found


def snapshot_binaries(bins, dest):
    """Copies the binaries, so that a rebuild during the run cannot swap them between cases."""
    os.makedirs(dest, exist_ok=True)
    out = {}
    for key, path in bins.items():
        d = os.path.join(dest, os.path.basename(path))
        shutil.copy2(path, d)
        out[key] = d
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Cases: " + ", ".join(c.name for c in CASES))
    p.add_argument("--bin-dir", required=True, help="CMake build directory (holds broker/, worker/, client/, tests/)")
    p.add_argument("--case", action="append", choices=[c.name for c in CASES],
                   help="run only this case (repeatable); default all")
    p.add_argument("--n", type=int, default=None,
                   help=f"statements per case (default $GATHERER_NETNS_N, else {DEFAULT_N}, "
                        f"{SANITIZED_N} with --sanitized)")
    p.add_argument("--sanitized", action="store_true", help="sanitizer build: smaller N, longer deadlines")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds a client may run before it is killed as hung (default 90, 180 with --sanitized)")
    p.add_argument("--stall-timeout", type=float, default=None,
                   help="seconds without a new output line (outside the outage) before the client is killed "
                        "as hung (default 30, 60 with --sanitized)")
    p.add_argument("--keep", action="store_true", help="keep the logs and outputs in the temporary directory")
    p.add_argument("--server-bin", help="gatherer-bench-server to use instead of the one in --bin-dir")
    a = p.parse_args()
    if a.n is None:
        env = os.environ.get("GATHERER_NETNS_N")
        a.n = int(env) if env else (SANITIZED_N if a.sanitized else DEFAULT_N)
    if a.n < 10:
        p.error("--n must be at least 10")
    if a.deadline is None:
        a.deadline = 180.0 if a.sanitized else 90.0
    if a.stall_timeout is None:
        a.stall_timeout = 60.0 if a.sanitized else 30.0

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def on_signal(signum, _frame):
        # Once: the clean-up that follows (bounded by its own deadlines) is not
        # interrupted by a second Ctrl-C.
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, on_signal)

    cases = [c for c in CASES if not a.case or c.name in a.case]
    work_dir = tempfile.mkdtemp(prefix="gatherer-netns-")
    t_start = now()
    results = []
    try:
        try:
            bins = find_binaries(os.path.abspath(a.bin_dir), a.server_bin)
        except CaseFailure as e:
            log(f"FAIL: {e}")
            return 1
        try:
            check_privileges()
            remove_leftovers()
            preflight(f"{secrets.token_hex(2)}p")
        except Skip as e:
            log(f"SKIP: {e}")
            return SKIP
        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(os.path.getmtime(x) for x in bins.values())))
        log(f"binaries: {', '.join(bins.values())} (newest built {built}), copied for this run")
        runner = Runner(a, snapshot_binaries(bins, os.path.join(work_dir, "bin")), bins, work_dir)
        runner.probe_client()
        log(f"netns fault test: N={a.n} (N/2 but for worker-dead), cases: {', '.join(c.name for c in cases)}; "
            f"client {'with' if runner.client_has_broker_timeout else 'without'} --broker-timeout; "
            f"logs in {work_dir}{'' if a.keep else ' (removed at the end; --keep keeps them)'}")
        for i, case in enumerate(cases):
            log(f"[case] {case.name}: {case.title}")
            r = runner.run_case(case, i)
            results.append(r)
            if r["figures"]:
                log(r["figures"])
            if r["ok"]:
                log(f"[case] {case.name}: PASS ({r['wall']:.1f} s)")
            else:
                log(f"[case] {case.name}: FAIL ({r['wall']:.1f} s): {r['reason']}")
                if r.get("tails"):
                    log(r["tails"])
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({e or 'SIGINT'}): cleaning up")
        return 130
    finally:
        # Namespaces of this run that a failure in between may have left.
        for name in list_netns():
            m = NS_RE.match(name)
            if m and int(m.group(1)) == os.getpid():
                delete_netns(name)
        if a.keep:
            log(f"logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    failed = [r["name"] for r in results if not r["ok"]]
    log(f"netns fault test: {len(results) - len(failed)} of {len(results)} cases passed"
        f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; total {now() - t_start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
