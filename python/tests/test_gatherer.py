"""The Python package over Gatherer's C++ client: the Pyot Gatherer's API and
what it adds (streams, sync calls), against real HTTP servers on 127.0.0.1,
the embedded cluster and a tcp gatherer-broker with a gatherer-worker."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import gatherer
from gatherer import Gatherer, GathererError, Statement

from conftest import ENTRIES, bin_dir, summoner

QUIET = 40  # log_level: errors only, so the test output stays readable


def run(coro, timeout_s=30):
    """Runs a coroutine on a fresh event loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def league_then_summoners(g, api):
    """The Pyot example's shape: a league lists entries, each entry's summoner is fetched."""
    g.statements = [api.url("/league/gold")]
    (league,) = await g.gather()
    assert league.status == 200 and league.error is None
    entries = league.json()["entries"]
    assert len(entries) == ENTRIES
    g.statements = [api.url(f"/summoner/{e['summonerId']}") for e in entries]
    responses = await g.gather()
    assert responses is g.responses
    assert [r.json() for r in responses] == [summoner(e["summonerId"]) for e in entries]
    return responses


def test_league_entries_summoners(api):
    async def main():
        async with Gatherer(workers=8, log_level=QUIET) as g:
            await league_then_summoners(g, api)
            # The same Gatherer gathers again (reuse), here a bigger batch.
            g.statements = [api.url(f"/n/{i}") for i in range(300)]
            responses = await g.gather()
            assert [r.text for r in responses] == [str(i) for i in range(300)]

    run(main())


def test_statement_forms_and_response_fields(api):
    async def main():
        async with Gatherer(workers=4, log_level=QUIET, headers={"X-Default": "d"}) as g:
            g.statements = [
                api.url("/n/7"),
                {"method": "POST", "url": api.url("/echo"), "headers": {"X-A": "1"}, "body": b"\x00bin",
                 "timeout_ms": 5000},
                {"method": "PUT", "url": api.url("/echo"), "headers": [("X-B", "2")], "body": "text é",
                 "idempotent": True, "timeout_ms": None},
                Statement(api.url("/echo"), method="DELETE", headers={"X-C": "3"}),
            ]
            r = await g.gather()
        assert r[0].status == 200 and r[0].body == b"7" and r[0].text == "7"
        assert r[0].headers["X-Index"] == "7"
        assert r[0].headers["Set-Cookie"] == "a=1, b=2"  # repeated names joined
        assert [v for k, v in r[0].raw_headers if k == "Set-Cookie"] == ["a=1", "b=2"]
        assert r[0].attempts == 1 and r[0].elapsed > 0 and r[0].ok and r[0].worker
        echo = [x.json() for x in r[1:]]
        assert [e["method"] for e in echo] == ["POST", "PUT", "DELETE"]
        assert echo[0]["body"] == "\x00bin" and echo[0]["headers"]["X-A"] == "1"
        assert echo[1]["body"].encode("latin-1").decode() == "text é" and echo[1]["headers"]["X-B"] == "2"
        assert echo[2]["headers"]["X-C"] == "3"
        assert all(e["headers"]["X-Default"] == "d" for e in echo)

    run(main())


def test_errors_in_place(api, bench_server):
    async def main():
        async with Gatherer(workers=4, log_level=QUIET, max_attempts=1) as g:
            g.statements = [api.url("/n/0"), api.url("/status/404"), api.url("/n/2"),
                            "http://127.0.0.1:1/refused", api.url("/status/500"), bench_server + "/x"]
            r = await g.gather()
        assert [x.ok for x in r] == [True, False, True, False, False, True]
        assert r[1].status == 404 and r[1].error.code == "http_status" and r[1].text == "status 404"
        assert r[3].status == 0 and r[3].error.code == "unavailable" and r[3].error.message
        assert r[4].status == 500 and r[4].error.code == "http_status"
        assert r[5].json()["id"] == 1

    run(main())


def test_cancel_on_raise(api):
    async def main():
        async with Gatherer(workers=2, log_level=QUIET, cancel_on_raise=True, max_attempts=1) as g:
            g.statements = [api.url(f"/n/{i}") for i in range(5)] + [api.url("/status/404")] + \
                           [api.url(f"/n/{i}") for i in range(6, 40)]
            with pytest.raises(GathererError) as e:
                await g.gather()
            assert isinstance(e.value, RuntimeError)
            assert e.value.index == 5 and e.value.code == "http_status" and "5" in str(e.value)
            assert len(e.value.responses) == 40 and g.responses is e.value.responses
            # Completed ones are in place. With a window of 2, statement 5 started once all
            # of 0-4 but at most one had completed; the cancel dropped that one.
            done = [i for i, r in enumerate(e.value.responses) if r.ok and r.status == 200]
            assert all(e.value.responses[i].text == str(i) for i in done)
            assert len([i for i in done if i < 5]) >= 4
            # Still usable after the error.
            g.statements = [api.url("/n/1")]
            assert (await g.gather())[0].text == "1"

    run(main())


@pytest.mark.parametrize("bad, why", [
    ({"method": "GET"}, "no url"),
    ({"url": "/relative"}, "invalid"),
    ({"url": "ftp://127.0.0.1/x"}, "invalid"),
    (42, "a statement is"),
    ({"url": "http://127.0.0.1/", "colour": "red"}, "unknown key"),
    ({"url": "http://127.0.0.1/", "headers": {"X": "a\r\nb"}}, "invalid"),
])
def test_invalid_statement_raises_before_anything_is_sent(api, bad, why):
    async def main():
        async with Gatherer(workers=4, log_level=QUIET) as g:
            before = api.httpd.count
            g.statements = [api.url("/n/0"), api.url("/n/1"), bad, api.url("/n/3")]
            with pytest.raises(RuntimeError, match=r"statement 2\b") as e:
                await g.gather()
            assert why in str(e.value) and e.value.index == 2
            assert api.httpd.count == before  # nothing was sent
            g.statements = [api.url("/n/5")]
            assert (await g.gather())[0].text == "5"

    run(main())


def test_task_cancellation_is_prompt_and_the_gatherer_reusable(api):
    async def main():
        loop = asyncio.get_running_loop()
        async with Gatherer(workers=4, log_level=QUIET, max_attempts=1) as g:
            held = api.httpd.held
            g.statements = [api.url("/hold")] * 4 + [api.url(f"/n/{i}") for i in range(100)]
            task = asyncio.create_task(g.gather())
            # The loop is free while the C++ client fetches: this await runs.
            assert await loop.run_in_executor(None, api.wait_held, held + 4, 10)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - start < 2.0
            g.statements = [api.url("/n/9")]
            assert (await g.gather())[0].text == "9"

    run(main())


def test_sync_gather_and_cancel_from_another_thread(api):
    with Gatherer(workers=2, log_level=QUIET, max_attempts=1) as g:
        g.statements = [api.url(f"/n/{i}") for i in range(50)]
        assert [r.text for r in g.gather_sync()] == [str(i) for i in range(50)]
        held = api.httpd.held
        g.statements = [api.url("/hold")] * 2
        canceller = threading.Thread(target=lambda: api.wait_held(held + 2, 10) and g.cancel())
        canceller.start()
        start = time.monotonic()
        with pytest.raises(GathererError) as e:
            g.gather_sync()
        canceller.join(10)
        assert e.value.code == "cancelled" and time.monotonic() - start < 10
    # Module-level one-shot gather.
    r = gatherer.gather([api.url("/n/3"), api.url("/n/4")], workers=2, log_level=QUIET)
    assert [x.text for x in r] == ["3", "4"]


def test_stream_in_order_and_completion_order_from_a_generator(api):
    n = 600
    pulled = []

    def statements():
        for i in range(n):
            pulled.append(i)
            yield api.url(f"/n/{i}")

    async def main():
        async with Gatherer(workers=16, log_level=QUIET, reorder_buffer=64) as g:
            got = []
            async for index, response in g.stream(statements()):
                # Lazy: the source is never far ahead of what was handed out.
                assert len(pulled) <= index + 1 + 64 + 4 * 256
                got.append((index, response.text))
            assert got == [(i, str(i)) for i in range(n)]
            got = [(i, r.text) async for i, r in g.stream((api.url(f"/n/{i}") for i in range(n)),
                                                             order=gatherer.COMPLETION)]
            assert sorted(got) == [(i, str(i)) for i in range(n)]
            # An early exit cancels the rest; the Gatherer goes on.
            async with g.stream(api.url(f"/n/{i}") for i in range(10_000)) as s:
                async for index, response in s:
                    if index == 20:
                        break
            g.statements = [api.url("/n/2")]
            assert (await g.gather())[0].text == "2"
        # Synchronous stream.
        with Gatherer(workers=4, log_level=QUIET) as g:
            assert [(i, r.text) for i, r in g.stream_sync([api.url(f"/n/{i}") for i in range(30)])] == \
                   [(i, str(i)) for i in range(30)]

    run(main())


def test_stream_errors(api):
    def broken():
        yield api.url("/n/0")
        raise ValueError("source broke")

    async def main():
        async with Gatherer(workers=4, log_level=QUIET) as g:
            with pytest.raises(ValueError, match="source broke"):
                async for _ in g.stream(broken()):
                    pass
            with pytest.raises(RuntimeError, match=r"statement 1\b"):
                async for _ in g.stream([api.url("/n/0"), {"url": "nope"}]):
                    pass
            g.statements = [api.url("/n/1")]
            assert (await g.gather())[0].text == "1"

    run(main())


def test_the_event_loop_is_never_blocked(api, bench_server):
    """A gather that cannot end before the loop has ticked 200 times: the held
    requests are released by the ticker itself, so a blocked loop would hang
    it (until the test's deadline) instead of passing."""
    async def main():
        gaps = []
        held = api.httpd.held
        async with Gatherer(workers=64, log_level=QUIET) as g:
            g.statements = [api.url("/hold")] * 4 + [bench_server + f"/p/{i}" for i in range(20_000)]
            task = asyncio.create_task(g.gather())
            last = time.monotonic()
            while not task.done():
                await asyncio.sleep(0.002)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                if len(gaps) == 200:
                    assert not task.done() and api.httpd.held >= held  # still running: the loop is free
                    api.release_held()
            responses = await task
        assert len(gaps) >= 200
        assert len(responses) == 20_004 and all(r.ok for r in responses)
        assert max(gaps) < 0.5, max(gaps)

    run(main(), 60)


RSS_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from gatherer import Gatherer

    def hwm_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    async def main(base, n):
        marks = {}
        async with Gatherer(workers=256, log_level=40) as g:
            count = 0
            async for index, response in g.stream(f"{base}/m/{i}" for i in range(n)):
                assert index == count and response.status == 200, (index, count, response)
                count += 1
                if count == 10_000:
                    marks["at_10k"] = hwm_mb()
        assert count == n
        print(marks["at_10k"], hwm_mb())

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def test_stream_100k_in_bounded_memory(bench_server):
    """100k statements streamed from a generator: peak RSS after the first 10k
    and at the end barely differ (gather() of 100k ~600-byte bodies would hold
    far more than the bound)."""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, bench_server, "100000"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    at_10k, at_end = map(float, out.stdout.split())
    assert at_end - at_10k < 16, (at_10k, at_end)
    assert at_end < 100, at_end  # gather() of the same 100k: ~170 MB


def test_through_a_tcp_broker_and_worker_process(api, tcp_cluster):
    endpoint, broker, worker = tcp_cluster

    async def main():
        async with Gatherer(workers=8, log_level=QUIET, broker=endpoint) as g:
            responses = await league_then_summoners(g, api)
            assert len({r.worker for r in responses}) == 1  # the one gatherer-worker process
            got = [(i, r.text) async for i, r in g.stream(api.url(f"/n/{i}") for i in range(200))]
            assert got == [(i, str(i)) for i in range(200)]

    run(main())
    assert broker.p.poll() is None and worker.p.poll() is None

    # The session is closed on exit, also when leaving on an error.
    class Boom(Exception):
        pass

    async def fails():
        async with Gatherer(workers=2, log_level=QUIET, broker=endpoint) as g:
            g.statements = [api.url("/n/1")]
            await g.gather()
            sessions.append(g.session_id)
            raise Boom()

    sessions = []
    with pytest.raises(Boom):
        run(fails())
    broker.wait_line(rf"session {sessions[0]} closed", timeout_s=10)
    with Gatherer(workers=2, log_level=QUIET, broker=endpoint) as g:
        g.statements = [api.url("/n/2")]
        assert g.gather_sync()[0].text == "2"
        sid = g.session_id
        with pytest.raises(Boom):
            with g:
                raise Boom()
    broker.wait_line(rf"session {sid} closed", timeout_s=10)


CTRL_C_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from gatherer import Gatherer

    url, mode = sys.argv[1], sys.argv[2]
    with Gatherer(workers=4, log_level=40, max_attempts=1) as g:
        g.statements = [url] * 4
        if mode == "async":
            asyncio.run(g.gather())
        else:
            g.gather_sync()
""")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_ctrl_c_cancels_at_once(api, mode):
    held = api.httpd.held
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, api.url("/hold"), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert api.wait_held(held + 4, 15), "the statements never reached the server"
        start = time.monotonic()
        p.send_signal(subprocess.signal.SIGINT)
        _, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert time.monotonic() - start < 3.0
    assert p.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]


def test_one_run_at_a_time(api):
    async def main():
        async with Gatherer(workers=2, log_level=QUIET) as g:
            g.statements = [api.url(f"/n/{i}") for i in range(50)]
            first = asyncio.create_task(g.gather())
            await asyncio.sleep(0)  # let it start
            with pytest.raises(GathererError, match="already running"):
                await g.gather()
            assert len(await first) == 50

    run(main())


def test_invalid_options():
    with pytest.raises(TypeError, match="colour"):
        Gatherer(colour="red").gather_sync()
    with pytest.raises(GathererError) as e:
        with Gatherer(workers=0, log_level=QUIET):
            pass
    assert e.value.code == "invalid_argument"
    with pytest.raises(ValueError, match="order"):
        Gatherer().stream([], order="random")


def test_through_a_curve_broker(api, procs, tmp_path):
    """CURVE options pass through: a listed client key gathers, an unlisted one is refused."""
    import re

    d = bin_dir()
    keys = {}
    for name in ("broker", "client", "worker", "stranger"):
        subprocess.run([os.path.join(d, "client", "gatherer"), "keygen", str(tmp_path / name)], capture_output=True,
                       timeout=10, check=True)
        text = (tmp_path / f"{name}.key").read_text()
        keys[name] = {"curve_public_key": re.search(r'public-key = "(.{40})"', text).group(1),
                      "curve_secret_key": re.search(r'secret-key = "(.{40})"', text).group(1),
                      "curve_broker_key": None}
    from conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = procs([os.path.join(d, "broker", "gatherer-broker"), "--bind", endpoint,
                    "--curve-key", str(tmp_path / "broker.key"), "--curve-clients", str(tmp_path / "client.pub"),
                    "--curve-workers", str(tmp_path / "worker.pub")])
    procs([os.path.join(d, "worker", "gatherer-worker"), "--broker", endpoint, "--io-threads", "1",
           "--curve-broker-key", str(tmp_path / "broker.pub"), "--curve-key", str(tmp_path / "worker.key")])
    broker.wait_line(r" ready with ")
    broker_key = keys["broker"]["curve_public_key"]
    for k in keys.values():
        k["curve_broker_key"] = broker_key
    with Gatherer(workers=4, log_level=QUIET, broker=endpoint, broker_timeout_ms=20_000, **keys["client"]) as g:
        g.statements = [api.url(f"/n/{i}") for i in range(20)]
        assert [r.text for r in g.gather_sync()] == [str(i) for i in range(20)]
    with Gatherer(workers=4, log_level=QUIET, broker=endpoint, broker_timeout_ms=20_000, **keys["stranger"]) as g:
        g.statements = [api.url("/n/1")]
        with pytest.raises(GathererError) as e:
            g.gather_sync()
        assert e.value.code == "permission_denied", e.value
    with pytest.raises(GathererError, match="CURVE"):
        with Gatherer(broker=endpoint, curve_broker_key="too short", log_level=QUIET):
            pass


def test_https_and_proxy_options(tmp_path):
    """cacert, insecure, proxy and no_proxy reach the workers: a server whose CA
    is given answers, one whose CA is not fails in place, insecure skips the
    check; a dead proxy fails the fetch unless no_proxy names the host."""
    from conftest import ApiServer, free_port

    d = str(tmp_path)
    for cmd in (
        f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=py-test-ca "
        f"-keyout {d}/ca.key -out {d}/ca.pem",
        f"openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 "
        f"-keyout {d}/server.key -out {d}/server.csr",
        f"printf 'subjectAltName=IP:127.0.0.1' > {d}/san.ext && openssl x509 -req -in {d}/server.csr -CA {d}/ca.pem "
        f"-CAkey {d}/ca.key -CAcreateserial -days 2 -extfile {d}/san.ext -out {d}/server.pem",
    ):
        subprocess.run(cmd, shell=True, capture_output=True, timeout=30, check=True)
    server = ApiServer(tls=(f"{d}/server.pem", f"{d}/server.key"))
    try:
        urls = [server.url(f"/n/{i}") for i in range(5)]
        with Gatherer(workers=4, log_level=QUIET, cacert=f"{d}/ca.pem") as g:
            g.statements = urls
            assert [r.text for r in g.gather_sync()] == [str(i) for i in range(5)]
        with Gatherer(workers=4, log_level=QUIET, max_attempts=1) as g:
            g.statements = urls[:1]
            (r,) = g.gather_sync()
            assert r.status == 0 and r.error is not None, "an unknown CA was trusted"
        with Gatherer(workers=4, log_level=QUIET, insecure=True) as g:
            g.statements = urls[:1]
            assert g.gather_sync()[0].text == "0"
        with pytest.raises(GathererError) as e:
            with Gatherer(log_level=QUIET, cacert=f"{d}/missing.pem"):
                pass
        assert e.value.code == "invalid_argument" and "missing.pem" in str(e.value)
    finally:
        server.stop()

    plain = ApiServer()
    try:
        dead_proxy = f"http://127.0.0.1:{free_port()}"
        with Gatherer(workers=2, log_level=QUIET, max_attempts=1, proxy=dead_proxy, no_proxy="") as g:
            g.statements = [plain.url("/n/1")]
            (r,) = g.gather_sync()
            assert r.status == 0 and r.error is not None, "the proxy was not used"
        with Gatherer(workers=2, log_level=QUIET, max_attempts=1, proxy=dead_proxy, no_proxy="127.0.0.1") as g:
            g.statements = [plain.url("/n/1")]
            assert g.gather_sync()[0].text == "1"
        with Gatherer(workers=2, log_level=QUIET, max_buffered_bytes=1 << 20) as g:
            g.statements = [plain.url(f"/n/{i}") for i in range(10)]
            assert [r.text for r in g.gather_sync()] == [str(i) for i in range(10)]
    finally:
        plain.stop()
