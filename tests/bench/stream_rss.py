#!/usr/bin/env python3
"""Peak memory of a streamed `gatherer fetch` as the job grows (docs/architecture.md §1): N URLs, generated on the fly into a pipe, go through
the CLI (a) embedded and (b) via a tcp broker plus one worker process; the
output goes through a pipe to a counter that checks every line is 200 and in
input order.

    python3 tests/bench/stream_rss.py --build build/release [--sizes 100000,1000000] [--workers 256]

Prints a markdown table of peak RSS (MB) for the client, broker and worker
processes, wall seconds and req/s per run, then the ratio of each peak at the
largest N to the smallest: about 1 means memory does not grow with N. It
asserts nothing about speed; it exits non-zero only if a run's output is wrong.

How peaks are read: the client's from os.wait4 (ru_maxrss); the broker's and
worker's from VmHWM in /proc/<pid>/status just before they are stopped, each
run with a fresh broker and worker so the peak is that run's. Linux carries
the forking process's RSS at fork across exec into ru_maxrss, so this script
holds no URL list (its own RSS, printed, is a floor for the client figure).
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

# A URL generator and an output checker run as child processes of this same
# script (--generate / --count), so neither the URLs nor the responses ever sit
# in this process and neither competes with the other for one GIL.


def generate(n, port):
    out = sys.stdout.buffer
    batch = []
    for i in range(n):
        batch.append(b"http://127.0.0.1:%d/players/%d\n" % (port, i))
        if len(batch) == 4096:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))
    out.flush()


def count(n):
    """Reads JSON Lines on stdin; exits 0 iff there are n lines, line i starting
    {"index":i,"status":200, with a null error."""
    lines = 0
    for line in sys.stdin.buffer:
        if not line.startswith(b'{"index":%d,"status":200,' % lines) or b'"error":null' not in line:
            sys.stderr.write(f"counter: line {lines} wrong: {line[:200]!r}\n")
            # Keep draining so the client is not killed by SIGPIPE mid-run.
            for _ in sys.stdin.buffer:
                pass
            sys.exit(1)
        lines += 1
    if lines != n:
        sys.stderr.write(f"counter: {lines} lines, expected {n}\n")
        sys.exit(1)


def vm_hwm_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def self_rss_mb():
    return vm_hwm_mb(os.getpid())


def free_endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def run_once(a, n, port, endpoint):
    """One streamed fetch of n URLs; returns (wall s, client peak MB)."""
    me = [sys.executable, os.path.abspath(__file__)]
    cmd = [f"{a.build}/client/gatherer", "fetch", "--workers", str(a.workers), "--log-level", "error"]
    if endpoint:
        cmd += ["--broker", endpoint]
    gen = subprocess.Popen(me + ["--generate", str(n), str(port)], stdout=subprocess.PIPE)
    counter = subprocess.Popen(me + ["--count", str(n)], stdin=subprocess.PIPE)
    start = time.monotonic()
    client = subprocess.Popen(cmd, stdin=gen.stdout, stdout=counter.stdin, stderr=subprocess.PIPE)
    # The children hold the pipe ends now; ours would keep EOF from coming.
    gen.stdout.close()
    counter.stdin.close()
    # A hung run must not hang the benchmark.
    watchdog = threading.Timer(a.timeout, client.kill)
    watchdog.start()
    err = []
    reader = threading.Thread(target=lambda: err.append(client.stderr.read()))
    reader.start()
    _, status, usage = os.wait4(client.pid, 0)
    wall = time.monotonic() - start
    watchdog.cancel()
    reader.join()
    client.stderr.close()
    client.returncode = os.waitstatus_to_exitcode(status)
    gen.wait()
    if counter.wait() != 0 or client.returncode != 0:
        sys.exit(f"run N={n} {'tcp' if endpoint else 'embedded'} failed: exit {client.returncode}, "
                 f"counter {counter.returncode}\n{err[0][-2000:].decode(errors='replace')}")
    return wall, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build/release")
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated N, smallest first")
    ap.add_argument("--workers", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is killed")
    ap.add_argument("--generate", nargs=2, type=int, metavar=("N", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, metavar="N", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.generate:
        return generate(*a.generate)
    if a.count is not None:
        return count(a.count)

    sizes = [int(s) for s in a.sizes.split(",")]
    server = subprocess.Popen([f"{a.build}/tests/bench/gatherer-bench-server"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = int(server.stdout.readline().split()[1])
    rows = []  # (n, mode, client MB, broker MB, worker MB, wall s)
    try:
        for n in sizes:
            wall, client_mb = run_once(a, n, port, None)
            rows.append((n, "embedded", client_mb, None, None, wall))
            # Fresh processes per row, so VmHWM is this run's peak.
            endpoint = free_endpoint()
            broker = subprocess.Popen([f"{a.build}/broker/gatherer-broker", "--bind", endpoint,
                                       "--log-level", "error"])
            worker = subprocess.Popen([f"{a.build}/worker/gatherer-worker", "--broker", endpoint,
                                       "--log-level", "error"])
            try:
                wall, client_mb = run_once(a, n, port, endpoint)
                broker_mb, worker_mb = vm_hwm_mb(broker.pid), vm_hwm_mb(worker.pid)
            finally:
                for p in (worker, broker):
                    p.terminate()
                for p in (worker, broker):
                    p.wait()
            rows.append((n, "tcp broker + 1 worker", client_mb, broker_mb, worker_mb, wall))
    finally:
        server.terminate()
        _, server_err = server.communicate()
    served = int(server_err.split()[-1])
    expected = 2 * sum(sizes)
    if served != expected:
        sys.exit(f"server counted {served} requests, expected {expected}")

    def mb(x):
        return "—" if x is None else f"{x:.1f}"

    print(f"\n--workers {a.workers}, ~600-byte JSON bodies, {os.cpu_count()} cores, server requests "
          f"checked: {served}, this script's peak RSS {self_rss_mb():.1f} MB\n")
    print("| N | mode | client peak RSS MB | broker peak RSS MB | worker peak RSS MB | wall s | req/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, mode, c, b, w, wall in rows:
        print(f"| {n:,} | {mode} | {mb(c)} | {mb(b)} | {mb(w)} | {wall:.1f} | {n / wall:,.0f} |")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nPeak RSS ratio N={hi:,} / N={lo:,} (1.0 = memory independent of N):\n")
        print("| mode | client | broker | worker |")
        print("|---|---:|---:|---:|")
        for mode in ("embedded", "tcp broker + 1 worker"):
            small = next(r for r in rows if r[0] == lo and r[1] == mode)
            big = next(r for r in rows if r[0] == hi and r[1] == mode)
            ratios = [mb(None) if s is None else f"{g / s:.2f}" for s, g in zip(small[2:5], big[2:5])]
            print(f"| {mode} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
