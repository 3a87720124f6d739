#!/usr/bin/env python3
"""The Python package's row of the benchmarks: the same work as aiohttp_gather.py,
through `gatherer` (Gatherer's C++ client under the Pyot API):

    python3 tests/bench/python_gather.py URL_FILE [--concurrency 256] [--print] [--build build/release]
                                         [--cacert CA.pem]

    async with Gatherer(workers=C) as g:
        g.statements = urls
        responses = await g.gather()

Imports the package from <build>/python when it was built there (the CMake
option GATHERER_PYTHON), else the installed one. Prints on stderr, in the form
the other rows use:

    ok <n> failed <f> seconds <s> req_per_s <r> p50_ms <a> p99_ms <b>

where p50/p99 are each response's `elapsed` (the worker-side time, as for the
gatherer CLI rows) and seconds covers opening the session, the gather and
closing it (as aiohttp_gather.py's covers its ClientSession). With
--print, writes the bodies in input order on stdout, one a line, after the
clock stopped. Exits 1 if any request failed or was not a 200.
"""
import argparse
import asyncio
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def percentile_ms(samples, p):
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(math.ceil(p * len(ordered)), 1) - 1] * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url_file")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--print", action="store_true", help="write the bodies in order on stdout")
    ap.add_argument("--cacert", default=None, help="CA bundle (PEM) for an https server")
    ap.add_argument("--build", default=os.path.join(HERE, "..", "..", "build", "release"),
                    help="build directory whose python/ holds the package (if built there)")
    a = ap.parse_args()
    if a.concurrency < 1:
        sys.exit("python_gather: --concurrency must be >= 1")
    built = os.path.join(os.path.abspath(a.build), "python")
    if os.path.isfile(os.path.join(built, "gatherer", "__init__.py")):
        sys.path.insert(0, built)
    from gatherer import Gatherer

    with open(a.url_file) as f:
        urls = [line.strip() for line in f if line.strip()]

    async def run():
        start = time.monotonic()
        tls = {"cacert": a.cacert} if a.cacert else {}
        async with Gatherer(workers=a.concurrency, log_level=30, **tls) as g:
            g.statements = urls
            responses = await g.gather()
        return responses, time.monotonic() - start

    responses, elapsed = asyncio.run(run())
    failed = sum(1 for r in responses if r.status != 200 or r.error is not None)
    if a.print:
        out = sys.stdout.buffer
        for r in responses:
            out.write(r.body)
            out.write(b"\n")
        out.flush()
    rate = len(urls) / elapsed if elapsed > 0 else 0.0
    seconds = [r.elapsed for r in responses]
    sys.stderr.write(f"ok {len(urls) - failed} failed {failed} seconds {elapsed:.3f} req_per_s {rate:.0f} "
                     f"p50_ms {percentile_ms(seconds, 0.50):.3f} p99_ms {percentile_ms(seconds, 0.99):.3f}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
