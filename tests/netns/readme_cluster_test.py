#!/usr/bin/python3
"""The README's "Running on several machines", run as written.

    sudo /usr/bin/python3 tests/netns/readme_cluster_test.py --bin-dir build/release [--keep]

Reads the section from README.md: every ```sh block marked `<!-- on: MACHINE -->`
runs in MACHINE's network namespace, from a working directory of its own,
with the build's gatherer, gatherer-broker and gatherer-worker first on PATH;
a command starting gatherer-broker or gatherer-worker keeps running (a
service), any other must exit 0. The `<!-- copy -->` table's copies are made
between the machines' directories. Each machine has the address the README
gives it (192.0.2.0/24, the documentation range, on a bridge in a namespace of
its own: nothing leaves the machine). The test adds only what the README leaves
to the reader: an HTTP server (gatherer-bench-server) on a fifth machine,
192.0.2.30, and the client's urls.txt of N URLs on it.

Checks: the client exits 0 with N responses, in order, every one 200 with the
server's body, served by both workers; the server saw N requests.
Exit status 0 pass, 1 fail, 77 skipped (not root, no `ip`, namespaces refused).
"""
import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netns_test as nt  # noqa: E402  (namespaces, processes, waits)

MACHINES = {"broker": 10, "worker-a": 11, "worker-b": 12, "client": 20, "web": 30}
SUBNET = "192.0.2"
SERVICES = ("gatherer-broker", "gatherer-worker")


class Cluster(nt.Topology):
    """The README's machines on one bridge, at the README's addresses."""

    def addr(self, role):
        return f"{SUBNET}.{MACHINES[role]}"

    def hub_port(self, role):
        return f"h-{role}"[:15]


def read_section(readme):
    """[(kind, machine or None, lines)] of the section, in order."""
    text = open(readme).read()
    start = text.index("## Running on several machines")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    steps = []
    for m in re.finditer(r"<!-- (on: ([\w-]+)|copy) -->\n```(\w+)\n(.*?)```", section, re.S):
        lines = [l.strip() for l in m.group(4).splitlines() if l.strip() and not l.strip().startswith("#")]
        if m.group(1) == "copy":
            steps.append(("copy", None, lines))
        else:
            steps.append(("run", m.group(2), lines))
    return steps


def parse_copy(line):
    """'broker.pub from broker to worker-a, client:dir/' -> (file, src, [(machine, subdir)])."""
    m = re.fullmatch(r"(\S+)\s+from\s+([\w-]+)\s+to\s+(.+)", line)
    if not m:
        raise nt.CaseFailure(f"copy line not understood: {line!r}")
    targets = []
    for t in m.group(3).split(","):
        machine, _, subdir = t.strip().partition(":")
        targets.append((machine, subdir))
    return m.group(1), m.group(2), targets


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--readme", default=os.path.join(HERE, "..", "..", "README.md"))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    bins = {name: os.path.join(a.bin_dir, rel) for name, rel in
            {"gatherer": "client/gatherer", "gatherer-broker": "broker/gatherer-broker",
             "gatherer-worker": "worker/gatherer-worker", "server": "tests/bench/gatherer-bench-server"}.items()}
    for path in bins.values():
        if not os.access(path, os.X_OK):
            nt.log(f"FAIL: binary not found: {path}")
            return 1
    try:
        nt.check_privileges()
        nt.remove_leftovers()
        nt.preflight(f"{secrets.token_hex(2)}p")
    except nt.Skip as e:
        nt.log(f"SKIP: {e}")
        return nt.SKIP
    work = tempfile.mkdtemp(prefix="gatherer-readme-cluster-")
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir)
    for name in ("gatherer", "gatherer-broker", "gatherer-worker"):
        shutil.copy2(bins[name], os.path.join(bin_dir, name))
    cluster = Cluster(secrets.token_hex(2), list(MACHINES))
    procs = []
    failures = []
    try:
        cluster.create()
        dirs = {m: os.path.join(work, m) for m in MACHINES}
        for d in dirs.values():
            os.makedirs(d)
        server = nt.Proc("server", cluster.ns["web"], [bins["server"], "--bind", cluster.addr("web")], work)
        procs.append(server)
        port = nt.wait_for(lambda: (re.search(r"port (\d+)", server.read_out()) or [None, None])[1],
                           nt.START_TIMEOUT_S, "the HTTP server's port", [server])
        with open(os.path.join(dirs["client"], "urls.txt"), "w") as f:
            for i in range(a.n):
                f.write(f"http://{cluster.addr('web')}:{port}/item/{i}\n")
        env_path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        steps = read_section(a.readme)
        if not steps:
            raise nt.CaseFailure("no marked steps found in the README section")
        client_rc = None
        broker_proc = None
        started_workers = 0
        for kind, machine, lines in steps:
            if kind == "copy":
                for line in lines:
                    name, src, targets = parse_copy(line)
                    for dst, subdir in targets:
                        to = os.path.join(dirs[dst], subdir)
                        os.makedirs(to, exist_ok=True)
                        shutil.copy2(os.path.join(dirs[src], name), to)
                        nt.log(f"copied {name} from {src} to {dst}:{subdir}")
                continue
            for cmd in lines:
                nt.log(f"[{machine}] $ {cmd}")
                argv = ["/usr/bin/env", f"PATH={env_path}", "sh", "-c", f"cd {dirs[machine]} && exec {cmd}"]
                name = f"{machine}-{len(procs)}"
                proc = nt.Proc(name, cluster.ns[machine], argv, work)
                procs.append(proc)
                if cmd.split()[0] in SERVICES:
                    if cmd.startswith("gatherer-broker"):
                        broker_proc = proc
                        nt.wait_for(lambda: "listening" in proc.read_err(), nt.START_TIMEOUT_S,
                                    "the broker to listen", [proc])
                    else:
                        # As a reader would: the worker is up before the next step.
                        started_workers += 1
                        nt.wait_for(lambda: broker_proc.read_err().count("ready with") >= started_workers,
                                    nt.START_TIMEOUT_S, f"worker {started_workers} to register", [proc, broker_proc])
                    continue
                rc = proc.wait(a.deadline)
                if rc is None:
                    proc.kill()
                    raise nt.CaseFailure(f"[{machine}] {cmd}: still running after {a.deadline} s\n"
                                         f"{proc.read_err()[-2000:]}")
                if cmd.startswith("gatherer fetch"):
                    client_rc = rc
                elif rc != 0:
                    raise nt.CaseFailure(f"[{machine}] {cmd}: exit {rc}\n{proc.read_err()[-2000:]}")
        if client_rc != 0:
            failures.append(f"the client exited {client_rc}: {procs[-1].read_err()[-2000:]}")
        out = os.path.join(dirs["client"], "responses.jsonl")
        lines = open(out).read().splitlines() if os.path.exists(out) else []
        if len(lines) != a.n:
            failures.append(f"{len(lines)} responses, expected {a.n}")
        workers = set()
        for i, line in enumerate(lines):
            r = json.loads(line)
            if r.get("index") != i or r.get("status") != 200 or not r.get("body"):
                failures.append(f"response {i} wrong: {line[:200]}")
                break
            workers.add(r.get("worker"))
        if len(workers) < 2:
            failures.append(f"served by {len(workers)} worker(s), expected both: {sorted(map(str, workers))}")
        served = nt.http_get_in_ns(cluster.ns["web"], cluster.addr("web"), port, "/_stats/requests", timeout=5)
        if served is None or int(str(served).strip() or -1) != a.n:
            failures.append(f"the server saw {served} requests, expected {a.n}")
        if broker_proc is None:
            failures.append("the README section never starts gatherer-broker")
    except (nt.CaseFailure, RuntimeError) as e:
        failures.append(str(e))
    finally:
        for proc in procs:
            proc.kill(signal.SIGKILL)
            proc.wait(nt.KILL_TIMEOUT_S)
        cluster.destroy()
        if a.keep:
            nt.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        nt.log(f"FAIL: {f}")
    if not failures:
        nt.log(f"readme cluster: PASS: {a.n} statements through a CURVE broker and two workers, as the README says")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
