"""Per-request bookkeeping: a request id, one structured JSON log line, and the metrics;
and the request rate limits.

The log line holds the method, path, route, status, duration and request id (and the
JSON-RPC method names signd serves); never a body, a header value or a query string, which
may carry secrets. :class:`BatchingLogHandler` writes those lines in batches, each within
50 ms (``signd serve`` installs it).

:class:`StopAtShutdown` keeps the requests in flight (:class:`RequestsInFlight`), so that
``signd serve`` can answer those that outlast its shutdown grace period with a 503 rather than
let uvicorn cancel them into a plain-text 500.

Rate limits wrap the authentication seam (:func:`rate_limited`), which REST, JSON-RPC and
MQTT all pass: a token bucket per authenticated client id, and one per remote address that
only failed authentications drain. A refusal is :class:`~signd.api.errors.RateLimited`
(429 ``rate_limited``; JSON-RPC -32005, "limit exceeded"); :class:`RefusalHeaders` adds its
``Retry-After`` header to the HTTP answer, and ``Connection: close`` to a 408 (a body that did
not arrive within ``body_timeout``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as json_string
from typing import Any, Final, TextIO

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from signd.api.errors import RateLimited
from signd.api.metrics import ApiMetrics
from signd.api.service import Authenticator, Principal
from signd.api.settings import ApiSettings
from signd.gate.errors import Unauthenticated

ACCESS_LOGGER: Final = "signd.api.access"
access_log = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID_HEADER_NAME: Final = REQUEST_ID_HEADER.encode()
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNMATCHED: Final = "unmatched"
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class _RequestIds:
    """Fresh request ids: 32 hex digits, 16 random ones drawn once per process (again in a
    forked child) followed by a counter, so ids never repeat; not secrets."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.restart)


def new_request_id() -> str:
    """A fresh request id, unique across processes: 32 lowercase hex digits (like a uuid4's)."""
    return _request_ids.next()


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a short plain token, else a fresh one."""
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_HEADER_NAME:
            text = bytes(value).decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return new_request_id()


_MILLISECONDS_SUFFIX: Final = "+00:00"
_second_text: tuple[int, str] = (-1, "")
"""The last whole second :func:`utc_timestamp` formatted, and its text up to the seconds."""


def utc_timestamp(time_ns: int | None = None) -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")`` (of ``time_ns``, nanoseconds
    since the epoch, when given), the same text for less: each second is formatted once."""
    global _second_text
    nanoseconds = time.time_ns() if time_ns is None else time_ns
    second, within = divmod(nanoseconds, 1_000_000_000)
    cached_second, text = _second_text
    if second != cached_second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:-6]
        _second_text = (second, text)
    return f"{text}.{within // 1_000_000:03d}{_MILLISECONDS_SUFFIX}"


def access_line(
    request_id: str,
    method: str,
    path: str,
    route: str,
    status: int,
    duration_ms: float,
    rpc_methods: list[str] | None = None,
) -> str:
    """The access log line: the text ``json.dumps`` gives for its fields, in this order.

    ``request_id`` is a plain token and ``method`` an upper-case HTTP method (or "other"),
    which JSON needs no escape for; the path and route are escaped.
    """
    line = (
        f'{{"ts": "{utc_timestamp()}", "event": "request", "request_id": "{request_id}", '
        f'"method": "{method}", "path": {json_string(path)}, "route": {json_string(route)}, '
        f'"status": {status:d}, "duration_ms": {duration_ms!r}'
    )
    if rpc_methods is not None:
        return f'{line}, "rpc_methods": {json.dumps(rpc_methods)}}}'
    return line + "}"


class RequestLog:
    """ASGI middleware: request id in and out, an access log line and metrics per request."""

    def __init__(
        self, app: ASGIApp, *, metrics: ApiMetrics, routes: Mapping[Callable[..., Any], str]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (_REQUEST_ID_HEADER_NAME, request_id.encode("latin-1"))
        status = 500
        started = time.perf_counter()

        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            return send(message)  # awaited by the caller: no coroutine of its own

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = self.routes.get(scope.get("endpoint"), UNMATCHED)  # type: ignore[arg-type]
            method = scope["method"]
            if method not in HTTP_METHODS:
                method = "other"
            self.metrics.requests.inc(route, method, str(status))
            self.metrics.latency.observe(duration, route)
            if access_log.isEnabledFor(logging.INFO):
                line = access_line(
                    request_id,
                    method,
                    scope["path"],
                    route,
                    status,
                    round(duration * 1000, 3),
                    state.get("rpc_methods"),
                )
                access_log.info(line)


ACCESS_LINE_DELAY: Final = 0.05
"""At most this many seconds pass between an access line's logging and its write."""
MAX_BATCHED_LINES: Final = 256


class BatchingLogHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes access lines (``signd.api.access``, INFO) in batches:
    each reaches the stream, flushed, within ``delay`` seconds (a thread sees to it) or as soon
    as ``max_lines`` wait. Any other record is written and flushed at once, after the lines
    waiting, so the order holds; :meth:`flush`, :meth:`close` and :func:`logging.shutdown`
    (at interpreter exit) write what waits.

    Without it, every access line costs a write system call on the event loop.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        delay: float = ACCESS_LINE_DELAY,
        max_lines: int = MAX_BATCHED_LINES,
    ) -> None:
        super().__init__(stream)
        self.delay = delay
        self.max_lines = max_lines
        self._waiting: list[str] = []
        self._due = threading.Event()
        """Set when lines wait; the flushing thread then writes them ``delay`` later."""
        self._flusher: threading.Thread | None = None
        self._closed = False
        _batching_handlers.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            if record.name != ACCESS_LOGGER or record.levelno != logging.INFO or self._closed:
                self._write(text)
                return
            self._waiting.append(text)
            if len(self._waiting) >= self.max_lines:
                self._write("")
            elif len(self._waiting) == 1:
                self._wake_flusher()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write("")
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self._closed = True
            self._write("")
        finally:
            self.release()
        self._due.set()  # the flushing thread sees the handler closed and ends
        super().close()

    def _write(self, text: str) -> None:
        """Write the waiting lines, then ``text``, and flush the stream (under the lock)."""
        if self._waiting:
            text = "".join(self._waiting) + text
            self._waiting.clear()
        if text:
            self.stream.write(text)
        self.stream.flush()

    def _wake_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_when_due, name="signd-log-flusher", daemon=True
            )
            self._flusher.start()
        self._due.set()

    def _flush_when_due(self) -> None:
        while True:
            self._due.wait()
            if not self._closed:
                time.sleep(self.delay)
            self.acquire()
            try:
                self._due.clear()
                if self._closed:
                    return
                self._write("")
            except (OSError, ValueError):
                pass  # the stream is gone, and the lines with it
            finally:
                self.release()

    def _after_fork_in_child(self) -> None:
        """The parent writes the lines waiting; the child starts its own flushing thread."""
        self._waiting.clear()
        self._due = threading.Event()
        self._flusher = None


_batching_handlers: weakref.WeakSet[BatchingLogHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_batching_handlers):
        handler._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


_CONNECTION_CLOSE: Final = (b"connection", b"close")
RETRY_AFTER_STATE: Final = "retry_after"
"""Where :func:`rate_limited` leaves a refusal's ``Retry-After`` seconds (request state)."""
MAX_BUCKETS: Final = 10_000


class TokenBuckets:
    """A token bucket per key: each holds up to ``burst`` tokens and gains ``rate`` a second.

    ``clock`` gives seconds (monotonic); tests pass their own. At most ``max_keys`` buckets are
    kept, the least recently used forgotten first (a forgotten bucket starts full again).
    Not thread-safe: the API uses it from the event loop only.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_BUCKETS,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a token bucket needs a positive rate, burst and key count")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """key -> (tokens, when they were counted)"""

    def _tokens(self, key: str, now: float) -> float:
        tokens, counted = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - counted) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token (0 when it has one now); nothing is taken."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, key: str) -> float:
        """Take one of ``key``'s tokens and answer 0; when it has none, take nothing and
        answer the seconds until it will have one."""
        now = self._clock()
        tokens = self._tokens(key, now)
        waiting = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._keep(key, tokens - 1 if waiting == 0 else tokens, now)
        return waiting

    def charge(self, key: str) -> None:
        """Take one of ``key``'s tokens whether or not it has one: the bucket may go below
        empty, and lets nothing through until it has refilled to a whole token. For costs
        found out only after the fact, such as a failed authentication, so that requests
        that were all in flight while the bucket still held a token are each paid for."""
        now = self._clock()
        self._keep(key, self._tokens(key, now) - 1, now)

    def _keep(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)


def remote_address(request: Request) -> str:
    """Who sent an unauthenticated request: its peer address; an MQTT message, its topic."""
    client = request.scope.get("client")
    if client:
        return str(client[0])
    mqtt = request.scope.get("extensions", {}).get("signd.mqtt")
    if isinstance(mqtt, dict) and "topic" in mqtt:
        return f"mqtt:{mqtt['topic']}"
    return "unknown"


def _refuse(request: Request, seconds: float) -> RateLimited:
    refusal = RateLimited(seconds)
    request.scope.setdefault("state", {})[RETRY_AFTER_STATE] = refusal.retry_after
    return refusal


def rate_limited(
    authenticate: Authenticator,
    settings: ApiSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Authenticator:
    """``authenticate`` within the rate limits of ``settings`` (itself when both are off).

    Before authentication, an address whose failed-authentication bucket is empty is refused;
    an authentication that fails (401) takes a token from it, even past empty
    (:meth:`TokenBuckets.charge`): the requests let in while the bucket held a token may be
    many at once, and each failure among them is paid for, so the address's failures keep to
    the rate however many it has in flight. After authentication the client's bucket gives
    one token per request (a batch is one request).
    """
    clients = (
        TokenBuckets(settings.rate_limit, settings.rate_limit_burst, clock=clock)
        if settings.rate_limit
        else None
    )
    failures = (
        TokenBuckets(settings.auth_failure_rate_limit, settings.auth_failure_burst, clock=clock)
        if settings.auth_failure_rate_limit
        else None
    )
    if clients is None and failures is None:
        return authenticate

    async def authenticate_within_limits(request: Request) -> Principal:
        address = remote_address(request)
        if failures is not None and (seconds := failures.wait(address)):
            raise _refuse(request, seconds)
        try:
            principal = await authenticate(request)
        except Unauthenticated:
            if failures is not None:
                failures.charge(address)
            raise
        if clients is not None and (seconds := clients.take(principal.name)):
            raise _refuse(request, seconds)
        return principal

    return authenticate_within_limits


class RefusalHeaders:
    """ASGI middleware: the headers a refusal carries. The ``Retry-After`` of a 429 that
    :func:`rate_limited` refused; ``Connection: close`` on a 408 (a body that did not arrive in
    time, :class:`~signd.api.errors.RequestTimeout`), so that the server closes the connection
    rather than keep waiting on a client that does not send."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        def send_with_refusal_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 429:
                    seconds = scope.get("state", {}).get(RETRY_AFTER_STATE)
                    if seconds is not None:
                        retry_after = (b"retry-after", str(seconds).encode("latin-1"))
                        message["headers"] = [*message.get("headers", ()), retry_after]
                elif status == 408:
                    message["headers"] = [*message.get("headers", ()), _CONNECTION_CLOSE]
            return send(message)  # awaited by the caller: no coroutine of its own

        await self.app(scope, receive, send_with_refusal_headers)


class RequestsInFlight:
    """The HTTP requests being answered, each by the task that answers it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._stopped.discard(task)

    def stopped(self, task: asyncio.Task[Any]) -> bool:
        """Whether :meth:`stop_all` cancelled ``task``."""
        return task in self._stopped

    def stop_all(self) -> int:
        """Cancel every request in flight, for :class:`StopAtShutdown` to answer; how many."""
        for task in self._tasks - self._stopped:
            self._stopped.add(task)
            task.cancel()
        return len(self._tasks)


class StopAtShutdown:
    """ASGI middleware: each HTTP request is kept in ``requests`` while it is answered, and
    one that :meth:`RequestsInFlight.stop_all` stops before its answer started gets
    ``refusal(scope)`` instead (what it asked may have been done: the audit log says)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        requests: RequestsInFlight,
        refusal: Callable[[Scope], Response],
    ) -> None:
        self.app = app
        self.requests = requests
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        answering = False

        def send_noting_the_answer(message: Message) -> Awaitable[None]:
            nonlocal answering
            if message["type"] == "http.response.start":
                answering = True
            return send(message)  # awaited by the caller: no coroutine of its own

        self.requests.add(task)
        try:
            await self.app(scope, receive, send_noting_the_answer)
        except asyncio.CancelledError:
            if not self.requests.stopped(task) or answering:
                raise
            task.uncancel()
            await self.refusal(scope)(scope, receive, send)
        finally:
            self.requests.discard(task)
