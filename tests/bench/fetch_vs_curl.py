#!/usr/bin/env python3
"""Side-by-side throughput: `gatherer fetch` (embedded, and via a tcp broker
with one worker process) vs a bare libcurl multi loop: same URLs, same local
server, same run, alternating.

    python3 tests/bench/fetch_vs_curl.py --build build/release [--n 20000] [--concurrency 256] [--runs 5]

Prints a markdown table: req/s median (min-max), ratio to bare libcurl (median
of per-pair ratios), CPU seconds (user+sys) and peak RSS of the process. Every
run is checked: N responses, all 200 with the server's body, in order.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def run(cmd, stdin_path, check):
    with open(stdin_path, "rb") as stdin, tempfile.TemporaryFile() as out:
        start = time.monotonic()
        p = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.monotonic() - start
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        out.seek(0)
        check(out, err, os.waitstatus_to_exitcode(status))
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build/release")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--delay-ms", type=int, default=0)
    a = ap.parse_args()

    server = subprocess.Popen([f"{a.build}/tests/bench/gatherer-bench-server", "--delay-ms", str(a.delay_ms)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = int(server.stdout.readline().split()[1])
    urls = tempfile.NamedTemporaryFile("w", delete=False, suffix=".txt")
    for i in range(a.n):
        urls.write(f"http://127.0.0.1:{port}/players/{i}\n")
    urls.close()

    def check_curl(out, err, code):
        if code != 0 or f"ok {a.n} failed 0" not in err:
            sys.exit(f"curl baseline failed: {err}")

    def check_gatherer(out, err, code):
        lines = out.read().splitlines()
        if code != 0 or len(lines) != a.n:
            sys.exit(f"gatherer fetch failed: exit {code}, {len(lines)} lines\n{err[-2000:]}")
        for i, line in enumerate(lines):
            if not line.startswith(b'{"index":%d,"status":200,' % i) or b'"error":null' not in line:
                sys.exit(f"gatherer fetch line {i} wrong: {line[:200]!r}")

    # A broker and one worker process on tcp for the cluster row.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    broker = subprocess.Popen([f"{a.build}/broker/gatherer-broker", "--bind", endpoint, "--log-level", "error"])
    worker = subprocess.Popen([f"{a.build}/worker/gatherer-worker", "--broker", endpoint, "--log-level", "error"])

    rows = {"bare libcurl multi (1 thread)": [], "gatherer fetch, embedded": [],
            "gatherer fetch, tcp broker + 1 worker process (client CPU only)": []}
    curl_cmd = [f"{a.build}/tests/bench/curl-multi-baseline", "--concurrency", str(a.concurrency)]
    gatherer_cmd = [f"{a.build}/client/gatherer", "fetch", "--workers", str(a.concurrency), "--log-level", "error"]
    cluster_cmd = gatherer_cmd + ["--broker", endpoint]
    try:
        for _ in range(a.runs):
            rows["bare libcurl multi (1 thread)"].append(run(curl_cmd, urls.name, check_curl))
            rows["gatherer fetch, embedded"].append(run(gatherer_cmd, urls.name, check_gatherer))
            rows["gatherer fetch, tcp broker + 1 worker process (client CPU only)"].append(
                run(cluster_cmd, urls.name, check_gatherer))
    finally:
        for p in (worker, broker, server):
            p.terminate()
        for p in (worker, broker):
            p.wait()
        _, err = server.communicate()
        os.unlink(urls.name)
    served = int(err.split()[-1])
    expected = a.n * a.runs * len(rows)
    if served != expected:
        sys.exit(f"server counted {served} requests, expected {expected}")

    base = rows["bare libcurl multi (1 thread)"]
    print(f"\nN = {a.n}, C = {a.concurrency}, delay {a.delay_ms} ms, {a.runs} runs each, "
          f"{os.cpu_count()} cores, server requests checked: {served}\n")
    print("| program | req/s median (min-max) | ratio to libcurl | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, samples in rows.items():
        rates = [a.n / s[0] for s in samples]
        ratios = [(a.n / s[0]) / (a.n / b[0]) for s, b in zip(samples, base)]
        print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
              f"{statistics.median(ratios):.2f} | {statistics.median(s[1] for s in samples):.2f} | "
              f"{statistics.median(s[2] for s in samples):.0f} |")


if __name__ == "__main__":
    main()
