"""Where errors meet the wire: one function turns any exception into an HTTP status, a JSON
body and a JSON-RPC error.

The HTTP status is the one each :class:`~signd.errors.SigndError` class declares; the
JSON-RPC code comes from :data:`JSONRPC_CODES`, most specific class first. Anything that is
not a ``SigndError`` is a bug: it answers ``500 internal_error`` with a fixed message, and the
traceback goes to the server log only.

The API adds a few errors that only exist at the HTTP boundary::

    SigndError
    ├── RouteNotFound                   404: no such route
    ├── MethodNotAllowed                405: the route exists, the method does not
    ├── DownstreamError                 502: the downstream node answered with a JSON-RPC error
    ├── RateLimited                     429: over the request rate limit (Retry-After says when)
    ├── InvalidRequest
    │   ├── PayloadTooLarge             413: the body is over the configured limit
    │   ├── RequestTimeout              408: the body did not arrive within the time allowed
    │   ├── TargetTooLong               414: the path and query are over 8192 characters
    │   ├── HeadersTooLarge             431: too many or too long credential headers
    │   ├── ClientDisconnected          499: the client left before its body arrived
    │   └── DuplicateRequest            409: a request id already used for another request

and the gate's (:mod:`signd.gate.errors`): ``Unauthenticated`` (401), ``OutOfScope``,
``BlindSigningDisabled`` and ``PolicyDenied`` (403, with the ``rule`` in the body and in
JSON-RPC ``data``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Final

from signd.errors import (
    AccessDenied,
    CapacityExceeded,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidRequest,
    KeyExists,
    KeyNotFound,
    SigndError,
    UnsupportedOperation,
)
from signd.gate.errors import Unauthenticated

log = logging.getLogger("signd.api")

INTERNAL_MESSAGE: Final = "internal error"


class RouteNotFound(SigndError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(SigndError):
    code = "method_not_allowed"
    http_status = 405


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413


class RequestTimeout(InvalidRequest):
    """The client did not send its whole body within ``body_timeout`` seconds: nothing was done
    for it, and its connection is closed after the answer (``Connection: close``), so that a
    client cannot hold a connection open by never finishing its body."""

    code = "request_timeout"
    http_status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


class TargetTooLong(InvalidRequest):
    """A path and query longer than any route of signd takes."""

    code = "uri_too_long"
    http_status = 414


class HeadersTooLarge(InvalidRequest):
    """More credential headers, or longer ones, than any credential is."""

    code = "headers_too_large"
    http_status = 431


class ClientDisconnected(InvalidRequest):
    """The client closed the connection before its whole body arrived: nothing was done
    for it, and its answer reaches nobody. 499 is the status proxies log for it ("client
    closed request"); here it is what the access log and the metrics record."""

    code = "client_disconnected"
    http_status = 499

    def __init__(self) -> None:
        super().__init__("the client disconnected before its request body arrived")


class DuplicateRequest(InvalidRequest):
    """A correlation id already given to another request (another payload) from the same
    sender while its answer is remembered (:mod:`signd.api.idempotency`): the first request
    keeps its answer, this one is not performed."""

    code = "duplicate_request"
    http_status = 409


class RateLimited(SigndError):
    """Over a request rate limit: the client's, or before authentication its address's.
    ``retry_after`` is in whole seconds, as the ``Retry-After`` header gives it."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"over the request rate limit; retry after {self.retry_after} s")


class DownstreamError(SigndError):
    """The downstream node refused a call; its JSON-RPC error object is passed on unchanged."""

    code = "downstream_error"
    http_status = 502

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "the downstream node refused the request")))
        self.rpc_error = error


# JSON-RPC 2.0 reserves -32768..-32000; -32099..-32000 is for the server to define.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

JSONRPC_CODES: Final[dict[type[SigndError], int]] = {
    InvalidRequest: INVALID_PARAMS,
    UnsupportedOperation: -32009,
    KeyNotFound: -32001,
    KeyExists: -32002,
    Unauthenticated: -32010,
    AccessDenied: -32003,
    IntegrityError: -32004,
    CapacityExceeded: -32005,
    RateLimited: -32005,
    DependencyUnavailable: -32006,
    ConfigurationError: -32007,
    DownstreamError: -32008,
    SigndError: -32000,
}
"""JSON-RPC codes by error class; an error takes the entry of its nearest listed ancestor."""


@dataclass(frozen=True, slots=True)
class WireError:
    """An exception as the API tells it: HTTP status, ``{code, message, field?}``, JSON-RPC."""

    http_status: int
    body: dict[str, str]
    rpc_code: int

    def rpc_error(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member: signd's code (and field) go in ``data``."""
        data = {"code": self.body["code"]}
        for name in ("field", "rule"):
            if name in self.body:
                data[name] = self.body[name]
        return {"code": self.rpc_code, "message": self.body["message"], "data": data}


def wire_error(exc: BaseException) -> WireError:
    """The one place an exception becomes an API answer."""
    if isinstance(exc, SigndError):
        rpc_code = next(JSONRPC_CODES[cls] for cls in type(exc).__mro__ if cls in JSONRPC_CODES)
        return WireError(exc.http_status, exc.to_dict(), rpc_code)
    log.error("unhandled error", exc_info=exc)
    return WireError(500, {"code": "internal_error", "message": INTERNAL_MESSAGE}, INTERNAL_ERROR)
