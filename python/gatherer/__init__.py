"""Gatherer for Python: the Pyot ``Gatherer`` API over Gatherer's C++ client.

    import asyncio
    from gatherer import Gatherer

    async def main():
        async with Gatherer(workers=25) as g:
            g.statements = ["http://127.0.0.1:8080/a", {"method": "POST", "url": "...", "body": b"..."}]
            responses = await g.gather()          # also in g.responses, in order

    asyncio.run(main())

The fetching runs in C++ (libcurl on the worker's I/O threads) on a background
thread with the GIL released; the event loop only receives the results. With
no ``broker`` the session runs on a broker and a worker embedded in this
process; ``broker="tcp://host:5555"`` uses a ``gatherer-broker`` and its
``gatherer-worker`` processes instead.
"""

import asyncio
import collections
import threading

from . import _gatherer
from ._gatherer import Response, ResponseError, Statement

__all__ = ["Gatherer", "GathererError", "Response", "ResponseError", "Statement", "gather", "INPUT", "COMPLETION"]
__version__ = _gatherer.__version__

INPUT = "input"
COMPLETION = "completion"

# Responses handed from the fetching thread to Python at a time (fewer when
# the stream would otherwise wait), and how many such batches may wait for
# the reader: with the C++ client's reorder buffer, the whole bound on what a
# stream holds, whatever the number of statements.
_BATCH = 256
_BATCHES_AHEAD = 4
# A cancelled run is waited for up to this long; the cancel is repeated every
# _RECANCEL_S meanwhile, since one that falls just before the run started is
# cleared by it.
_CANCEL_DEADLINE_S = 30.0
_RECANCEL_S = 0.05


class GathererError(RuntimeError):
    """A gather() or stream that failed as a whole: an invalid statement (before
    anything was sent), a failure under cancel_on_raise, cancel(), a broker that
    stopped answering. ``index`` is the statement's index (or -1), ``code`` the
    error code's name (``invalid_argument``, ``http_status``, ``cancelled``, ...).
    After a failed gather(), ``responses`` holds what had completed."""

    def __init__(self, message, index=-1, code="internal"):
        super().__init__(message)
        self.index = index
        self.code = code
        self.responses = None


_gatherer._set_error_type(GathererError)


def _completion(order):
    if order in (INPUT, "input"):
        return False
    if order in (COMPLETION, "completion"):
        return True
    raise ValueError(f"order must be 'input' or 'completion', not {order!r}")


class _Call:
    """fn(*args) on a thread of its own; ``notify()`` runs on that thread once
    it has finished (and ``done`` is set)."""

    def __init__(self, fn, args, notify=None):
        self.done = threading.Event()
        self.result = None
        self.error = None
        self._notify = notify
        self.thread = threading.Thread(target=self._run, args=(fn, args), name="gatherer", daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            self.error = e
        self.done.set()
        if self._notify is not None:
            self._notify()

    def value(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.result

    def wait_cancelled(self, core):
        """Blocks until the call ended after core.cancel(), bounded."""
        deadline = _CANCEL_DEADLINE_S
        while not self.done.wait(_RECANCEL_S) and deadline > 0:
            core.cancel()
            deadline -= _RECANCEL_S


def _async_call(loop, fn, *args):
    """Starts fn(*args) on a thread; returns (call, future done when it ends).
    The loop learns of the end through call_soon_threadsafe: it never blocks."""
    future = loop.create_future()

    def settle():
        if not future.done():
            future.set_result(None)

    def notify():
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    return _Call(fn, args, notify), future


async def _wait_cancelled(call, future, core):
    """Waits (bounded) for a cancelled call to end, cancelling again meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CANCEL_DEADLINE_S
    while not future.done() and loop.time() < deadline:
        try:
            await asyncio.wait({future}, timeout=_RECANCEL_S)
        except asyncio.CancelledError:
            pass  # cancelling already; the caller re-raises its own
        core.cancel()


async def _await(call, future, core):
    """The call's result; cancelling the awaiting task cancels the session at once."""
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        core.cancel()
        await _wait_cancelled(call, future, core)
        raise
    return call.value()


def _wait_sync(call, core):
    """The call's result; Ctrl-C (KeyboardInterrupt) cancels the session at once."""
    try:
        call.done.wait()
    except BaseException:
        core.cancel()
        call.wait_cancelled(core)
        raise
    return call.value()


class Gatherer:
    """Fetches ``statements`` on a pool of workers; ``await gather()`` returns one
    response per statement, in order (also in ``responses``).

    A statement is a URL string, a dict ``{"method", "url", "headers", "body",
    "timeout_ms", "idempotent"}`` (only ``url`` required; headers a dict or a
    list of pairs, body str or bytes) or a :class:`Statement`.

    workers          statements in flight at once (the sliding window)
    log_level        Python logging levels for Gatherer's own log lines (stderr)
    cancel_on_raise  False: a failed statement's error sits at its index.
                     True: the first failure cancels the rest and gather()
                     raises GathererError naming its index.
    broker           "tcp://host:port" of a gatherer-broker; None = embedded
    options          the C++ client's other options and session settings:
                     base_url, headers, timeout_ms, session_connect_timeout_ms,
                     max_attempts, backoff_base_ms, backoff_max_ms,
                     retry_after_max_ms, max_body_bytes, max_redirects,
                     accept_min, accept_max, prefetch, reorder_buffer,
                     max_in_flight_bytes, max_buffered_bytes,
                     embedded_io_threads, connect_timeout_ms,
                     broker_timeout_ms; for HTTPS cacert (a PEM file or a
                     directory of them), cert and key (a client certificate,
                     PEM files), insecure (True skips verification, with a
                     warning: for testing only); proxy and no_proxy (default:
                     the workers' http_proxy, https_proxy, no_proxy); and for
                     a broker that requires CURVE curve_broker_key,
                     curve_public_key, curve_secret_key (Z85, from
                     `gatherer keygen`)

    Use it as ``async with`` (or ``with``): the session is closed on exit, also
    on error. It opens on first use and may gather() many times; the options
    apply when it opens.
    """

    def __init__(self, workers=25, log_level=10, cancel_on_raise=False, broker=None, **options):
        self.workers = workers
        self.log_level = log_level
        self.cancel_on_raise = cancel_on_raise
        self.broker = broker
        self.options = options
        self.statements = []
        self.responses = []
        self._core = None
        self._streams = set()
        self._busy = False  # a gather() or stream is running (one at a time)

    # --- session ---------------------------------------------------------------

    def _claim(self):
        """The open session, for one gather() or stream at a time."""
        if self._busy:
            raise GathererError("a gather() or stream is already running on this Gatherer", -1,
                                "failed_precondition")
        core = self._open()
        core.reset()
        self._busy = True
        return core

    def _open(self):
        if self._core is None or self._core.closed:
            options = dict(self.options)
            options.update(workers=self.workers, log_level=self.log_level, cancel_on_raise=self.cancel_on_raise,
                           broker=self.broker or "")
            self._core = _gatherer._Core(options)
        return self._core

    @property
    def session_id(self):
        return self._open().session_id

    async def __aenter__(self):
        self._open()
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    def __enter__(self):
        self._open()
        return self

    def __exit__(self, *exc):
        self.close()

    async def aclose(self):
        """Stops open streams and closes the session, without blocking the loop."""
        for s in list(self._streams):
            await s.aclose()
        core, self._core = self._core, None
        if core is not None and not core.closed:
            call, future = _async_call(asyncio.get_running_loop(), core.close)
            await asyncio.shield(future)
            call.value()

    def close(self):
        """Closes the session (waits for the broker to confirm, at most 5 s)."""
        for s in list(self._streams):
            s.close()
        core, self._core = self._core, None
        if core is not None:
            core.close()

    def cancel(self):
        """Cancels the running gather() or stream, from any thread."""
        if self._core is not None:
            self._core.cancel()

    # --- gather ---------------------------------------------------------------

    async def gather(self):
        """Fetches every statement; returns ``responses``, one per statement in
        order. Raises GathererError (a RuntimeError) naming the index of an
        invalid statement before anything is sent, and under cancel_on_raise
        the first failure. Cancelling the awaiting task cancels the session."""
        statements = list(self.statements)
        core = self._claim()
        try:
            call, future = _async_call(asyncio.get_running_loop(), core.gather, statements)
            self.responses = await _await(call, future, core)
        except GathererError as e:
            e.responses = self.responses = core.partial() or []
            raise
        finally:
            self._busy = False
        return self.responses

    def gather_sync(self):
        """gather() for scripts, without an event loop. Ctrl-C cancels."""
        statements = list(self.statements)
        core = self._claim()
        try:
            self.responses = _wait_sync(_Call(core.gather, (statements,)), core)
        except GathererError as e:
            e.responses = self.responses = core.partial() or []
            raise
        finally:
            self._busy = False
        return self.responses

    # --- stream -----------------------------------------------------------------

    def stream(self, statements, order=INPUT):
        """``async for index, response in g.stream(iterable)``: statements are
        pulled from the iterable (which may be lazy, e.g. a generator) only as
        the window frees, and responses come in input order (or as they
        finish, with order=COMPLETION), in bounded memory. Leaving the loop
        early: use ``async with g.stream(...) as s`` or ``await s.aclose()``
        (leaving the Gatherer closes it too)."""
        return _AsyncStream(self, statements, _completion(order))

    def stream_sync(self, statements, order=INPUT):
        """stream() for scripts: ``for index, response in g.stream_sync(it)``."""
        return _SyncStream(self, statements, _completion(order))


class _StreamBase:
    def __init__(self, gatherer, statements, completion):
        self._gatherer = gatherer
        self._statements = statements
        self._completion = completion
        self._core = None
        self._call = None
        self._batches = collections.deque()
        self._current = ()
        self._pos = 0
        self._credits = threading.Semaphore(_BATCHES_AHEAD)
        self._stop = threading.Event()
        self._finished = False

    def _start(self, notify):
        self._core = self._gatherer._claim()
        self._gatherer._streams.add(self)
        self._call = _Call(self._core.stream, (self._statements, self._completion, self._sink, _BATCH), notify)

    def _take(self):
        """The next item ready, or None."""
        while True:
            if self._pos < len(self._current):
                item = self._current[self._pos]
                self._current[self._pos] = None
                self._pos += 1
                return item
            if not self._batches:
                return None
            self._current = self._batches.popleft()
            self._pos = 0
            self._credits.release()

    def _finish(self):
        if self._call is not None and not self._finished:
            self._gatherer._busy = False
        self._finished = True
        self._gatherer._streams.discard(self)

    def _signal_stop(self):
        self._stop.set()
        self._core.cancel()
        self._credits.release()  # a sink waiting for room sees the stop


class _AsyncStream(_StreamBase):
    def __init__(self, gatherer, statements, completion):
        super().__init__(gatherer, statements, completion)
        self._loop = None
        self._wake = None
        self._done = None

    # On the fetching thread, with the GIL: waits for room, then queues.
    def _sink(self, items):
        self._credits.acquire()
        if self._stop.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _deliver(self, items):
        self._batches.append(items)
        self._notify_loop()

    def _notify_loop(self):
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _ended(self):
        self._done = True
        self._notify_loop()

    def __aiter__(self):
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            self._loop = asyncio.get_running_loop()
            self._done = False
            loop = self._loop

            def notify():
                try:
                    loop.call_soon_threadsafe(self._ended)
                except RuntimeError:
                    pass

            self._start(notify)
        while True:
            item = self._take()
            if item is not None:
                return item
            # Every batch is queued on the loop before the end is.
            if self._done:
                self._finish()
                self._call.value()
                raise StopAsyncIteration
            self._wake = self._loop.create_future()
            try:
                await self._wake
            except asyncio.CancelledError:
                await self.aclose()
                raise

    async def aclose(self):
        """Stops the stream: what is queued or in flight is cancelled."""
        if self._call is None or self._finished:
            self._finished = True
            return
        self._signal_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CANCEL_DEADLINE_S
        while not self._done and loop.time() < deadline:
            self._wake = loop.create_future()
            try:
                await asyncio.wait({self._wake}, timeout=_RECANCEL_S)
            except asyncio.CancelledError:
                pass
            self._core.cancel()
        self._batches.clear()
        self._finish()

    def close(self):
        """Stops the stream from synchronous code (Gatherer.close)."""
        if self._call is None or self._finished:
            self._finished = True
            return
        self._signal_stop()
        self._call.wait_cancelled(self._core)
        self._finish()


class _SyncStream(_StreamBase):
    def __init__(self, gatherer, statements, completion):
        super().__init__(gatherer, statements, completion)
        self._cond = threading.Condition()

    def _sink(self, items):
        self._credits.acquire()
        if self._stop.is_set():
            return False
        with self._cond:
            self._batches.append(items)
            self._cond.notify()
        return True

    def _ended(self):
        with self._cond:
            self._cond.notify()

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._call is None:
            self._start(self._ended)
        try:
            with self._cond:
                while True:
                    item = self._take()
                    if item is not None:
                        return item
                    if self._call.done.is_set():
                        break
                    self._cond.wait()
        except BaseException:  # Ctrl-C: cancel the session at once
            self.close()
            raise
        self._finish()
        self._call.value()
        raise StopIteration

    def close(self):
        if self._call is None or self._finished:
            self._finished = True
            return
        self._signal_stop()
        self._call.wait_cancelled(self._core)
        self._batches.clear()
        self._finish()

    def __del__(self):
        if self._call is not None and not self._finished:
            self.close()


def gather(statements, **options):
    """One-shot synchronous gather for scripts: opens a Gatherer with `options`,
    fetches `statements`, closes it, returns the responses in order."""
    with Gatherer(**options) as g:
        g.statements = statements
        return g.gather_sync()
