"""What a request asks for, derived from the request as received: the one interpreter the host
and the enclave share.

The enclave does not trust the calls a host parsed: it authenticates the request's method,
target and body, then :func:`interpret` re-derives from those same bytes what to do, with
the parsers the API uses (:mod:`signd.gate.inputs`), so host and enclave agree by
construction. The routes::

    POST /v1/keys                         CreateKeys
    GET  /v1/keys?custody=&chain=&label=&cursor=&limit=
                                          ReadKeys, a page (custody defaults to keystore)
    GET  /v1/keys/{key}                   ReadKeys, one key by id or address
    POST /v1/sign/hash, /v1/sign/ethereum/{transaction,message,typed-data}
                                          SignCalls, one call (origin 0)
    POST /v1/sign/batch                   SignCalls, one call per item (origin: its index);
                                          a malformed item fails the request, as in the API
    POST / and /rpc                       JSON-RPC: SignCalls, one slot per signing item
                                          (origin: its index in the batch, 0 if no batch),
                                          or NoSigning when no item signs
    POST /mqtt/<topic>                    SignCalls, one call (origin 0)

``HEAD`` is read as ``GET``, as Starlette does. Read more strictly than the API's router:
a query string is refused where the route takes none, and ``GET /v1/keys`` refuses an
unknown, repeated or malformed query parameter. An MQTT payload's envelope (``id``,
``reply_to``, ``auth``) is the host's to check; it does not change what is signed.

JSON-RPC: an item that is not a JSON-RPC 2.0 request, or whose method signs nothing
(``eth_accounts``, ``eth_chainId``, anything proxied downstream), has no slot; a signing item
with bad params has its error in its slot. Notifications (no ``id``) sign like requests.
``eth_signTransaction`` and ``eth_sendTransaction`` carry the transaction as the caller sent
it: what a host fills in from its downstream node comes separately, through
:func:`apply_fills`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from signd.auth.request_signing import DEFAULT_NONCE_CAPACITY, default_nonce_quota
from signd.errors import InvalidField, InvalidRequest, SigndError
from signd.gate import inputs
from signd.gate.operations import SigningCall, SigningKind


@dataclass(frozen=True, slots=True)
class CreateKeys:
    """``POST /v1/keys``."""

    chain: str
    custody: str
    count: int
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadKeys:
    """``GET /v1/keys/{key}`` (``key`` set, the rest ``None``, ``limit`` 1) or a page of
    ``GET /v1/keys`` (``key`` None, ``custody`` set)."""

    key: str | None
    chain: str | None
    label: str | None
    custody: str | None
    cursor: str | None
    limit: int


@dataclass(frozen=True, slots=True)
class SignCalls:
    """Signing calls in request order, each with where it came from: ``origins[i]`` is the
    index of the batch item or JSON-RPC batch member that ``calls[i]`` is (0 when the
    request is not a batch). A JSON-RPC item with bad params is its error in its slot."""

    calls: tuple[SigningCall | SigndError, ...]
    origins: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.calls) != len(self.origins):
            raise ValueError("SignCalls needs one origin per call")


@dataclass(frozen=True, slots=True)
class NoSigning:
    """A JSON-RPC request in which nothing signs. ``method``: the method asked for; for a
    batch, its members' methods joined by commas ("" for a member that is not a request)."""

    method: str


Action = CreateKeys | ReadKeys | SignCalls | NoSigning


@dataclass(frozen=True, slots=True)
class Limits:
    """What the API is configured with that the gate enforces (``[api]`` ``max_batch``,
    ``max_keys_per_request``, ``allow_blind_signing``, the ``auth_failure_audit_*`` limit
    and the ``nonce_*`` bounds); the defaults are :class:`~signd.api.ApiSettings`'."""

    max_batch: int = 100
    max_keys_per_request: int = 1000
    allow_blind_signing: bool = False
    """Raw-hash signing at all: off, every hash call is refused (and audited) by the gate."""
    auth_failure_audit_rate: float = 2.0
    """Authentication refusals sealed one record each per second, on average; past it they
    are counted (:class:`~signd.gate.audit.RefusalRecords`). 0: each one recorded."""
    auth_failure_audit_burst: int = 1000
    """Authentication refusals sealed one record each at once."""
    nonce_capacity: int = DEFAULT_NONCE_CAPACITY
    """Request-signature nonces kept live at once (each until its request's timestamp
    leaves the window); past it, every new signed request is refused."""
    nonce_quota: int = default_nonce_quota(DEFAULT_NONCE_CAPACITY)
    """Nonces one client may keep live at once; past it, that client's new signed requests
    are refused, so that it cannot fill ``nonce_capacity`` for the others."""


DEFAULT_LIMITS: Final = Limits()
FILLABLE: Final = frozenset(
    {"nonce", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "chainId", "type"}
)
"""Transaction fields a host may fill from its downstream node when the caller left them out:
what :meth:`~signd.api.downstream.Downstream.fill_transaction` fills. Not ``accessList``:
the node never suggests one, and an access list is the caller's to give. The fee fields and
gas are the host's choice then, so what they may cost is for the policy to bound."""
_FILL_ALIASES: Final = {"gas": "gasLimit"}
"""A fill of ``gas`` is refused when the caller gave it as ``gasLimit``."""
_MAX_SHOWN: Final = 200
_LIST_PARAMETERS: Final = frozenset({"custody", "chain", "label", "cursor", "limit"})
_SIGN_ROUTES: Final = {f"/v1/sign/{kind.value}": kind for kind in SigningKind}
_RPC_ROUTES: Final = frozenset({"/", "/rpc"})
_MQTT_PREFIX: Final = "/mqtt/"
_KEY_PREFIX: Final = "/v1/keys/"
_BATCH_FIELDS: Final = frozenset({"requests"})
_SINGLE: Final = (0,)
"""The origins of a request that is not a batch."""


def interpret(method: str, target: str, body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Action:
    """What the request ``method target`` with ``body`` asks for. ``target`` is the path with
    its query string, exactly as sent (what a request signature covers)."""
    verb = "GET" if method == "HEAD" else method
    if target.startswith(_MQTT_PREFIX) and target != _MQTT_PREFIX:
        _expect(verb, "POST", target)
        payload = inputs.parse_object(body, "the payload")
        return SignCalls((inputs.parse_mqtt_request(payload),), _SINGLE)
    raw_path, _, query = target.partition("?")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the request path is not UTF-8 once percent-decoded") from None
    key = path.removeprefix(_KEY_PREFIX) if path.startswith(_KEY_PREFIX) else ""
    if path == "/v1/keys" and verb == "GET":
        return key_list_query(query)
    if path == "/v1/keys":
        _expect(verb, "POST", target, query)
        return _create_keys(inputs.parse_object(body), limits)
    if key and "/" not in key:
        _expect(verb, "GET", target, query)
        return ReadKeys(key, None, None, None, None, 1)
    if path in _SIGN_ROUTES:
        _expect(verb, "POST", target, query)
        call = inputs.parse_signing_request(_SIGN_ROUTES[path], inputs.parse_object(body))
        return SignCalls((call,), _SINGLE)
    if path == "/v1/sign/batch":
        _expect(verb, "POST", target, query)
        return _batch(inputs.parse_object(body), limits)
    if path in _RPC_ROUTES:
        _expect(verb, "POST", target, query)
        return _json_rpc(body, limits)
    raise InvalidRequest(f"signd serves no {_shown(method)} {_shown(target)}")


def apply_fills(transaction: Mapping[str, Any], fills: Mapping[str, Any]) -> dict[str, Any]:
    """``transaction`` with ``fills`` added: only :data:`FILLABLE` fields the caller left out
    (absent or null). A fill of anything else, or without a value, is refused, naming it."""
    filled = dict(transaction)
    for name, value in fills.items():
        if name not in FILLABLE:
            raise InvalidRequest(f"{name} is not a field the host may fill", field=name)
        given = _FILL_ALIASES.get(name, name)
        if transaction.get(name) is not None or transaction.get(given) is not None:
            raise InvalidRequest(f"{name} was given by the caller; it is not filled", field=name)
        if value is None:
            raise InvalidRequest(f"the fill of {name} has no value", field=name)
        filled[name] = value
    return filled


def _expect(method: str, wanted: str, target: str, query: str = "") -> None:
    if method != wanted:
        raise InvalidRequest(f"signd serves no {_shown(method)} {_shown(target)}")
    if query:
        raise InvalidRequest(f"{wanted} {_shown(target)}: this route takes no query string")


def _shown(text: str) -> str:
    """Caller-given text in a message, bounded."""
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _create_keys(body: Mapping[str, Any], limits: Limits) -> CreateKeys:
    inputs.check_fields(body, inputs.KEY_FIELDS)
    return CreateKeys(
        chain=inputs.text(body, "chain"),
        custody=inputs.text(body, "custody"),
        count=inputs.integer(body, "count", default=1, low=1, high=limits.max_keys_per_request),
        labels=tuple(inputs.string_list(body, "labels")),
    )


def key_list_query(query: str) -> ReadKeys:
    """The page of keys ``GET /v1/keys?query`` asks for (``query`` as sent, still
    percent-encoded): every parameter at most once, empty as if absent (``limit`` aside);
    an unknown, repeated or malformed one is refused. The API reads the query with this too,
    so that both gates refuse and serve the same pages."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the query string is malformed") from None
    given: dict[str, str] = {}
    for name, value in pairs:
        if name not in _LIST_PARAMETERS:
            raise InvalidField(f"unknown query parameter {_shown(name)}", field=_shown(name))
        if name in given:
            raise InvalidField(f"{name} is given more than once", field=name)
        given[name] = value
    return ReadKeys(
        key=None,
        chain=given.get("chain") or None,
        label=given.get("label") or None,
        custody=given.get("custody") or inputs.DEFAULT_LIST_CUSTODY,
        cursor=given.get("cursor") or None,
        limit=inputs.query_integer(
            given.get("limit"), "limit", default=100, low=1, high=inputs.MAX_PAGE
        ),
    )


def _batch(body: Mapping[str, Any], limits: Limits) -> SignCalls:
    inputs.check_fields(body, _BATCH_FIELDS)
    items = body.get("requests")
    if not isinstance(items, list) or not 1 <= len(items) <= limits.max_batch:
        raise InvalidField(
            f"requests must be a list of 1 to {limits.max_batch} requests", field="requests"
        )
    calls = tuple(inputs.parse_batch_item(index, item) for index, item in enumerate(items))
    return SignCalls(calls, tuple(range(len(calls))))


def _json_rpc(body: bytes, limits: Limits) -> SignCalls | NoSigning:
    message = inputs.parse_json(body)
    if isinstance(message, list) and not 1 <= len(message) <= limits.max_batch:
        raise InvalidRequest(f"a batch holds 1 to {limits.max_batch} requests")
    members = message if isinstance(message, list) else [message]
    calls: list[SigningCall | SigndError] = []
    origins: list[int] = []
    methods: list[str] = []
    for index, item in enumerate(members):
        if not isinstance(item, dict) or not inputs.is_rpc_request(item):
            methods.append("")
            continue
        methods.append(item["method"])
        if item["method"] not in inputs.RPC_SIGNING_METHODS:
            continue
        try:
            calls.append(inputs.rpc_signing_call(item["method"], item.get("params")))
        except SigndError as exc:
            calls.append(exc)
        origins.append(index)
    if not calls:
        return NoSigning(",".join(methods))
    return SignCalls(tuple(calls), tuple(origins))
