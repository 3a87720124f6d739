#!/usr/bin/env python3
"""The Python peer of the benchmarks: aiohttp `gather` over every URL with one
ClientSession and an asyncio.Semaphore(C), the approach Gatherer replaces.

    python3 tests/bench/aiohttp_gather.py URL_FILE [--concurrency 256] [--print]

The connector allows C connections in all and sets no per-host cap (aiohttp's
default is 100 in all), so the semaphore alone bounds what is in flight. Prints
on stderr, in the form curl-multi-baseline uses:

    ok <n> failed <f> seconds <s> req_per_s <r> p50_ms <a> p99_ms <b>

where p50/p99 are per-request times (from taking a semaphore slot to the whole
body read; nearest rank) and seconds covers the gather alone. With --print,
writes the bodies in input order on stdout, one a line, after the clock
stopped. Exits 1 if any request failed or was not a 200.
"""
import argparse
import ssl
import asyncio
import math
import sys
import time

import aiohttp


def percentile_ms(samples, p):
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(math.ceil(p * len(ordered)), 1) - 1] * 1000.0


async def fetch_all(urls, concurrency, timeout_s, cacert=None):
    semaphore = asyncio.Semaphore(concurrency)
    # https: the CA given, in place of the system's store.
    ssl_context = ssl.create_default_context(cafile=cacert) if cacert else None
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ssl=ssl_context)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    seconds = [0.0] * len(urls)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i, url):
            async with semaphore:
                start = time.monotonic()
                try:
                    async with session.get(url) as response:
                        body = await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    body, status = repr(e).encode(), 0
                seconds[i] = time.monotonic() - start
                return status, body

        results = await asyncio.gather(*(one(i, url) for i, url in enumerate(urls)))
    return results, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url_file")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=30, help="per-request timeout in seconds")
    ap.add_argument("--print", action="store_true", help="write the bodies in order on stdout")
    ap.add_argument("--cacert", default=None, help="trusted CA (PEM) for https URLs")
    a = ap.parse_args()
    if a.concurrency < 1:
        sys.exit("aiohttp_gather: --concurrency must be >= 1")
    with open(a.url_file) as f:
        urls = [line.strip() for line in f if line.strip()]

    start = time.monotonic()
    results, seconds = asyncio.run(fetch_all(urls, a.concurrency, a.timeout, a.cacert))
    elapsed = time.monotonic() - start

    failed = sum(1 for status, _ in results if status != 200)
    if a.print:
        out = sys.stdout.buffer
        for _, body in results:
            out.write(body)
            out.write(b"\n")
        out.flush()
    rate = len(urls) / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(f"ok {len(urls) - failed} failed {failed} seconds {elapsed:.3f} req_per_s {rate:.0f} "
                     f"p50_ms {percentile_ms(seconds, 0.50):.3f} p99_ms {percentile_ms(seconds, 0.99):.3f}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
