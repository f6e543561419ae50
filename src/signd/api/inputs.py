"""Reading request bodies: size limit, strict JSON, and typed fields that name themselves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

from starlette.requests import Request

from signd.api.errors import PayloadTooLarge
from signd.errors import InvalidField, InvalidRequest

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON (no NaN or Infinity); a parse failure is :class:`InvalidRequest`."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None


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
    body = parse_json(await read_body(request, limit))
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def text(body: Mapping[str, Any], name: str, *, where: str = "") -> str:
    """A required non-empty string field."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidField(f"{where}{name} must be a non-empty string", field=name)
    return value


def optional_text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidField(f"{name} must be a non-empty string", field=name)
    return value


def integer(body: Mapping[str, Any], name: str, *, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(f"{name} must be an integer from {low} to {high}", field=name)
    return value


def query_integer(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidField(f"{name} must be an integer from {low} to {high}", field=name)
    return int(raw)


def string_list(body: Mapping[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidField(f"{name} must be a list of strings", field=name)
    return value


def json_object(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise InvalidField(f"{name} must be a JSON object", field=name)
    return value


def hex_bytes(value: object, name: str, *, size: int | None = None) -> bytes:
    """``0x``-prefixed hex with an even number of digits (exactly ``size`` bytes if given)."""
    if (
        not isinstance(value, str)
        or value[:2] not in ("0x", "0X")
        or len(value) % 2
        or not _HEX_DIGITS.issuperset(value[2:])
    ):
        raise InvalidField(f"{name} must be 0x-prefixed hex with an even length", field=name)
    data = bytes.fromhex(value[2:])
    if size is not None and len(data) != size:
        raise InvalidField(f"{name} must be {size} bytes", field=name)
    return data


def message_bytes(value: object, name: str = "message") -> bytes:
    """A message to sign: a string is its UTF-8 bytes; ``{"hex": "0x.."}`` is raw bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict) and set(value) == {"hex"}:
        return hex_bytes(value["hex"], f"{name}.hex")
    raise InvalidField(f'{name} must be a string or {{"hex": "0x..."}}', field=name)
