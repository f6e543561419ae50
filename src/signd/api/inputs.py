"""Reading request bodies off Starlette requests, with a size limit.

The pure parsing (strict JSON, typed fields that name themselves) lives in
:mod:`signd.gate.inputs`, shared with the enclave; its helpers are re-exported here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from signd.api.errors import PayloadTooLarge
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
    "hex_bytes",
    "integer",
    "json_object",
    "message_bytes",
    "parse_json",
    "query_integer",
    "read_body",
    "read_object",
    "string_list",
    "text",
]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all.

    Kept on the request once read, so that authentication (which needs the body bytes) and
    the handler can both read it."""
    cached = getattr(request.state, "signd_body", None)
    if isinstance(cached, bytes):
        return cached
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.signd_body = body
    return body


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object."""
    return parse_object(await read_body(request, limit))
