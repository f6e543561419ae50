"""Reading what a request asks for: strict JSON, typed fields that name themselves, and the
:class:`~signd.gate.operations.SigningCall` of a REST, batch, MQTT or JSON-RPC request.

Trusted code, free of HTTP types: the API derives its calls through these functions and the
enclave re-derives them from the authenticated bytes (:mod:`signd.gate.interpret`), so the
two cannot drift apart. Every refusal is :class:`~signd.errors.InvalidRequest` or a subclass,
naming the field it is about.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn

from signd.errors import InvalidField, InvalidRequest
from signd.gate.operations import SigningCall, SigningKind

_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_ADDRESS: Final = re.compile(r"0[xX][0-9a-fA-F]{40}")

SIGNING_FIELDS: Final[Mapping[SigningKind, frozenset[str]]] = {
    SigningKind.HASH: frozenset({"key", "hash"}),
    SigningKind.ETH_TRANSACTION: frozenset({"key", "transaction"}),
    SigningKind.ETH_MESSAGE: frozenset({"key", "message"}),
    SigningKind.ETH_TYPED_DATA: frozenset({"key", "typed_data"}),
}
"""The body fields of each ``POST /v1/sign/<kind>``."""
SIGNING_KINDS: Final[Mapping[str, SigningKind]] = {kind.value: kind for kind in SigningKind}
KEY_FIELDS: Final = frozenset({"chain", "custody", "count", "labels"})
"""The body fields of ``POST /v1/keys``."""
DEFAULT_LIST_CUSTODY: Final = "keystore"
"""The custody ``GET /v1/keys`` lists when the query names none."""
MAX_PAGE: Final = 1000
"""The largest ``limit`` of ``GET /v1/keys``."""
MQTT_ENVELOPE_FIELDS: Final = frozenset({"id", "reply_to", "auth"})
"""MQTT payload fields about the message rather than the signing request."""


# JSON and fields


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON, but no number anything can answer with
        raise InvalidRequest(f"the number {text[:24]} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):  # readers in front of signd may take the first one
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise InvalidRequest(f"the field {name[:64]!r} is given twice in one JSON object")
            seen.add(name)
    return body


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object, parse_float=_finite, parse_constant=_refuse_constant
)


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")
"""A ``\\uD800``-``\\uDFFF`` escape: half of a UTF-16 pair, alone or not."""


def parse_json(data: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no number out of a float's range, no name twice in
    an object, no text that is not Unicode. A parse failure is :class:`InvalidRequest`.

    JSON's ``\\ud800`` escapes a lone surrogate, which has no UTF-8 form: a string holding
    one could not be written into any answer, log line or audit record (the enclave would
    fail to encode its answer after sealing its records). Such a body is refused here, with
    the field that holds the lone surrogate (:func:`lone_surrogate_at`)."""
    try:
        text = data.decode(json.detect_encoding(data))
        document = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):  # rare: look closer
        where = lone_surrogate_at(document)
        if where is not None:
            raise InvalidField(
                "the request holds text that is not Unicode (a lone UTF-16 surrogate)",
                field=where or None,
            )
    return document


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (or a name) holds a lone surrogate: the path of
    the value, as ``a.b[2].c`` (``""`` for the whole, or when it is a name at the top), or
    ``None`` when there is none."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for name, item in value.items():
            if not _is_unicode(name):
                return path
            found = lone_surrogate_at(item, f"{path}.{name}" if path else name)
            if found is not None:
                return found
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_object(data: bytes, what: str = "the request body") -> dict[str, Any]:
    """``data`` as a JSON object."""
    body = parse_json(data)
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return body


def check_fields(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Refuse unknown fields, so that a misspelt one cannot be silently ignored."""
    for name in body:
        if name not in allowed:
            raise InvalidField(f"unknown field {name}", field=name)


def text(body: Mapping[str, Any], name: str, *, where: str = "") -> str:
    """A required non-empty string field."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidField(f"{where}{name} must be a non-empty string", field=name)
    return value


def integer(body: Mapping[str, Any], name: str, *, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(f"{name} must be an integer from {low} to {high}", field=name)
    return value


def query_integer(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or not low <= int(raw) <= high:
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
        try:
            return value.encode()
        except UnicodeEncodeError:  # a lone surrogate, which JSON's \\ud800 can carry
            raise InvalidField(f"{name} is not valid Unicode text", field=name) from None
    if isinstance(value, dict) and set(value) == {"hex"}:
        return hex_bytes(value["hex"], f"{name}.hex")
    raise InvalidField(f'{name} must be a string or {{"hex": "0x..."}}', field=name)


# REST, batch items and MQTT messages


def parse_signing_request(kind: SigningKind, body: Mapping[str, Any]) -> SigningCall:
    """The body of ``POST /v1/sign/<kind>``."""
    check_fields(body, SIGNING_FIELDS[kind])
    key = text(body, "key")
    payload: Any
    if kind is SigningKind.HASH:
        payload = hex_bytes(body.get("hash"), "hash", size=32)
    elif kind is SigningKind.ETH_TRANSACTION:
        payload = json_object(body, "transaction")
    elif kind is SigningKind.ETH_MESSAGE:
        payload = message_bytes(body.get("message"))
    else:
        payload = json_object(body, "typed_data")
    return SigningCall(kind, key, payload)


def parse_typed_request(item: Mapping[str, Any], where: str = "") -> SigningCall:
    """A request that names its kind, ``{"type": ..., <that kind's fields>}``: a batch item or
    an MQTT message. With ``where``, errors name the place, e.g. ``requests[2].hash``."""
    prefix = f"{where}." if where else ""
    kind_name = item.get("type")
    if not isinstance(kind_name, str) or kind_name not in SIGNING_KINDS:
        raise InvalidField(
            f"{prefix}type must be one of {', '.join(SIGNING_KINDS)}", field=f"{prefix}type"
        )
    body = {name: value for name, value in item.items() if name != "type"}
    try:
        return parse_signing_request(SIGNING_KINDS[kind_name], body)
    except InvalidField as exc:
        if not where:
            raise
        raise InvalidField(f"{where}: {exc.message}", field=f"{prefix}{exc.field}") from None


def parse_batch_item(index: int, item: object) -> SigningCall:
    """One batch item; its errors name it, e.g. ``requests[2].hash``."""
    plain = _plain_hash_item(item)
    if plain is not None:
        return plain
    where = f"requests[{index}]"
    if not isinstance(item, dict):
        raise InvalidField(f"{where} must be a JSON object", field=where)
    return parse_typed_request(item, where)


def _plain_hash_item(item: object) -> SigningCall | None:
    """A well-formed hash item read in one pass (most of a large batch is these); ``None``
    for anything else, which :func:`parse_typed_request` then reads and names the error of."""
    if type(item) is not dict or len(item) != 3 or item.get("type") != "hash":
        return None
    key, digest = item.get("key"), item.get("hash")
    if (
        type(key) is not str
        or not key
        or type(digest) is not str
        or len(digest) != 66
        or digest[:2] not in ("0x", "0X")
    ):
        return None
    try:
        data = bytes.fromhex(digest[2:])
    except ValueError:
        return None
    if len(data) != 32:  # fromhex skips whitespace: 64 characters give 32 bytes only without
        return None
    return SigningCall(SigningKind.HASH, key, data)


def parse_mqtt_request(payload: Mapping[str, Any]) -> SigningCall:
    """An MQTT message's signing request: a batch item's fields after the envelope's."""
    return parse_typed_request(
        {name: value for name, value in payload.items() if name not in MQTT_ENVELOPE_FIELDS}
    )


# JSON-RPC


def valid_rpc_id(value: object) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, int | float) and not isinstance(value, bool))
    )


def is_rpc_request(item: Mapping[str, Any]) -> bool:
    """Whether a JSON object is a JSON-RPC 2.0 request (a notification when it has no id)."""
    return (
        item.get("jsonrpc") == "2.0"
        and isinstance(item.get("method"), str)
        and isinstance(item.get("params", []), list | dict)
        and valid_rpc_id(item.get("id"))
    )


def positional(params: object, least: int, most: int, method: str) -> list[Any]:
    """A method's positional parameters, ``least`` to ``most`` of them."""
    if params is None:
        params = []
    if not isinstance(params, list) or not least <= len(params) <= most:
        count = str(least) if least == most else f"{least} to {most}"
        raise InvalidRequest(f"{method} takes {count} positional parameter(s)")
    return params


def rpc_address(value: object, name: str = "address") -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise InvalidField(f"{name} must be a 0x-prefixed 20-byte address", field=name)
    return value


def _eth_sign(params: object) -> SigningCall:
    """geth's eth_sign(address, data): EIP-191 personal message over the data bytes."""
    address, data = positional(params, 2, 2, "eth_sign")
    return SigningCall(SigningKind.ETH_MESSAGE, rpc_address(address), hex_bytes(data, "data"))


def _personal_sign(params: object) -> SigningCall:
    """personal_sign(data, address[, password]): the password is not used by signd."""
    data, address, *_ = positional(params, 2, 3, "personal_sign")
    return SigningCall(SigningKind.ETH_MESSAGE, rpc_address(address), hex_bytes(data, "data"))


def _eth_sign_typed_data_v4(params: object) -> SigningCall:
    address, document = positional(params, 2, 2, "eth_signTypedData_v4")
    if isinstance(document, str):  # its JSON text, read as a body is
        document = parse_json(document.encode(errors="surrogatepass"))  # lone ones: refused
    if not isinstance(document, dict):
        raise InvalidField("typed data must be a JSON object or its JSON text", field="data")
    return SigningCall(SigningKind.ETH_TYPED_DATA, rpc_address(address), document)


def _transaction_method(method: str) -> Callable[[object], SigningCall]:
    """``method(transaction)``: the transaction as given (fills come separately), signed by
    its ``from`` address."""

    def parse(params: object) -> SigningCall:
        (transaction,) = positional(params, 1, 1, method)
        if not isinstance(transaction, dict):
            raise InvalidField("the transaction must be a JSON object", field="transaction")
        sender = rpc_address(transaction.get("from"), "from")
        return SigningCall(SigningKind.ETH_TRANSACTION, sender, transaction)

    return parse


RPC_SIGNING_METHODS: Final[Mapping[str, Callable[[object], SigningCall]]] = {
    "eth_sign": _eth_sign,
    "personal_sign": _personal_sign,
    "eth_signTransaction": _transaction_method("eth_signTransaction"),
    "eth_sendTransaction": _transaction_method("eth_sendTransaction"),
    "eth_signTypedData_v4": _eth_sign_typed_data_v4,
}
"""The JSON-RPC methods that sign, each with the parser of its ``params``."""


def rpc_signing_call(method: str, params: object) -> SigningCall:
    """What a signing JSON-RPC method (one of :data:`RPC_SIGNING_METHODS`) asks to sign."""
    return RPC_SIGNING_METHODS[method](params)
