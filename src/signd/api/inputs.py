"""Reading request bodies, off ASGI messages or Starlette requests, within a size limit and
a deadline.

The pure parsing (strict JSON, typed fields that name themselves) lives in
:mod:`signd.gate.inputs`, shared with the enclave; its helpers are re-exported here.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.types import Receive, Scope

from signd.api.deadlines import within
from signd.api.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout
from signd.errors import InvalidRequest
from signd.gate.inputs import (
    hex_bytes,
    integer,
    json_object,
    message_bytes,
    parse_json,
    parse_object,
    query_integer,
    string_list,
    text,
)

__all__ = [
    "body_read",
    "hex_bytes",
    "integer",
    "json_object",
    "message_bytes",
    "parse_json",
    "query_integer",
    "read_body",
    "read_object",
    "receive_body",
    "refuse_query_string",
    "string_list",
    "text",
]


BODY_STATE: Final = "signd_body"
"""Where the body, once read, is kept in the request's state."""


def body_read(scope: Scope) -> bytes | None:
    """The request's body if :func:`read_body` has read it, else ``None``."""
    body = scope.get("state", {}).get(BODY_STATE)
    return body if isinstance(body, bytes) else None


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all,
    and (408) a body not all in within ``timeout`` seconds.

    Kept on the request once read, so that authentication (which needs the body bytes) and
    the handler can both read it."""
    return await receive_body(request.scope, request.receive, limit, timeout)


async def receive_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """:func:`read_body` straight off an ASGI request's messages (no Starlette request)."""
    state = scope.setdefault("state", {})
    cached = state.get(BODY_STATE)
    if isinstance(cached, bytes):
        return cached
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"the request body is over {limit} bytes")
            break
    try:
        async with within(timeout):
            body = await _receive_chunks(receive, limit)
    except TimeoutError:
        raise RequestTimeout(timeout) from None
    state[BODY_STATE] = body
    return body


async def _receive_chunks(receive: Receive, limit: int) -> bytes:
    """The body's chunks up to the last one, joined; 413 at the chunk that crosses ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_object(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The body as a JSON object."""
    return parse_object(await read_body(request, limit, timeout))


def refuse_query_string(scope: Scope) -> None:
    """400 for a query string on a route that takes none (what the enclave's reading of the
    request refuses too), rather than ignoring it in one custody and failing in another.
    The authentication seam applies it to every POST route, before the gate is asked."""
    if scope.get("query_string"):
        raise InvalidRequest(f"{scope['method']} {scope['path']}: this route takes no query string")
