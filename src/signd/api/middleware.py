"""Per-request bookkeeping: a request id, one structured JSON log line, and the metrics;
and the request rate limits.

The log line holds the method, path, route, status, duration and request id (and the
JSON-RPC method names signd serves); never a body, a header value or a query string, which
may carry secrets.

Rate limits wrap the authentication seam (:func:`rate_limited`), which REST, JSON-RPC and
MQTT all pass: a token bucket per authenticated client id, and one per remote address that
only failed authentications drain. A refusal is :class:`~signd.api.errors.RateLimited`
(429 ``rate_limited``; JSON-RPC -32005, "limit exceeded"); :class:`RetryAfter` adds its
``Retry-After`` header to the HTTP answer.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from signd.api.errors import RateLimited
from signd.api.metrics import ApiMetrics
from signd.api.service import Authenticator, Principal
from signd.api.settings import ApiSettings
from signd.gate.errors import Unauthenticated

access_log = logging.getLogger("signd.api.access")

REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNMATCHED: Final = "unmatched"
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a short plain token, else a fresh one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = bytes(value).decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


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
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = self.routes.get(scope.get("endpoint"), UNMATCHED)  # type: ignore[arg-type]
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.inc(route, method, str(status))
            self.metrics.latency.observe(duration, route)
            line: dict[str, Any] = {
                "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "event": "request",
                "request_id": request_id,
                "method": method,
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
            }
            if "rpc_methods" in state:
                line["rpc_methods"] = state["rpc_methods"]
            access_log.info(json.dumps(line))


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
        self._buckets[key] = (tokens - 1 if waiting == 0 else tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return waiting


def remote_address(request: Request) -> str:
    """Who sent an unauthenticated request: its peer address; an MQTT message, its topic."""
    if request.client is not None:
        return request.client.host
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
    an authentication that fails (401) takes a token from it. After authentication the
    client's bucket gives one token per request (a batch is one request).
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
                failures.take(address)
            raise
        if clients is not None and (seconds := clients.take(principal.name)):
            raise _refuse(request, seconds)
        return principal

    return authenticate_within_limits


class RetryAfter:
    """ASGI middleware: the ``Retry-After`` header of a 429 that :func:`rate_limited` refused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                seconds = scope.get("state", {}).get(RETRY_AFTER_STATE)
                if seconds is not None:
                    MutableHeaders(scope=message).append("retry-after", str(seconds))
            await send(message)

        await self.app(scope, receive, send_with_retry_after)
