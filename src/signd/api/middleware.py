"""Per-request bookkeeping: a request id, one structured JSON log line, and the metrics.

The log line holds the method, path, route, status, duration and request id (and the
JSON-RPC method names signd serves); never a body, a header value or a query string, which
may carry secrets.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from signd.api.metrics import ApiMetrics

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
