"""The REST API under ``/v1``, plus ``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json``.

Bodies are JSON objects; unknown fields are refused so that a misspelt field cannot be
silently ignored. Every error answers ``{"error": {"code", "message", "field"?}}``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from signd.api import inputs
from signd.api.errors import wire_error
from signd.api.metrics import CONTENT_TYPE, ApiMetrics
from signd.api.openapi import openapi_document
from signd.api.service import (
    ANONYMOUS,
    Authenticator,
    Principal,
    SigningKind,
    SigningResult,
    SigningService,
)
from signd.crypto.secp256k1 import RecoverableSignature
from signd.errors import InvalidField
from signd.operations.signer import signature_to_dict

Handler = Callable[[Request, Principal], Awaitable[Response]]

SIGNING_FIELDS: Final[Mapping[SigningKind, frozenset[str]]] = {
    SigningKind.HASH: frozenset({"key", "hash"}),
    SigningKind.ETH_TRANSACTION: frozenset({"key", "transaction"}),
    SigningKind.ETH_MESSAGE: frozenset({"key", "message"}),
    SigningKind.ETH_TYPED_DATA: frozenset({"key", "typed_data"}),
}
KEY_FIELDS: Final = frozenset({"chain", "custody", "count", "labels"})
DEFAULT_LIST_CUSTODY: Final = "keystore"
MAX_PAGE: Final = 1000


def check_fields(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise InvalidField(f"unknown field {name}", field=name)


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """A signing request that passed validation: what to sign, with which key."""

    kind: SigningKind
    key: str
    payload: Any
    """The digest or message bytes, or the transaction or typed-data object."""


def parse_signing_request(kind: SigningKind, body: Mapping[str, Any]) -> SigningRequest:
    check_fields(body, SIGNING_FIELDS[kind])
    key = inputs.text(body, "key")
    payload: Any
    if kind is SigningKind.HASH:
        payload = inputs.hex_bytes(body.get("hash"), "hash", size=32)
    elif kind is SigningKind.ETH_TRANSACTION:
        payload = inputs.json_object(body, "transaction")
    elif kind is SigningKind.ETH_MESSAGE:
        payload = inputs.message_bytes(body.get("message"))
    else:
        payload = inputs.json_object(body, "typed_data")
    return SigningRequest(kind, key, payload)


SIGNING_KINDS: Final[Mapping[str, SigningKind]] = {kind.value: kind for kind in SigningKind}


def parse_typed_request(item: Mapping[str, Any], where: str = "") -> SigningRequest:
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


def parse_batch_item(index: int, item: object) -> SigningRequest:
    """One batch item; its errors name it, e.g. ``requests[2].hash``."""
    where = f"requests[{index}]"
    if not isinstance(item, dict):
        raise InvalidField(f"{where} must be a JSON object", field=where)
    return parse_typed_request(item, where)


async def perform_signing(
    service: SigningService, principal: Principal, request: SigningRequest
) -> dict[str, Any]:
    """Perform one validated signing request; the answer's JSON shape depends on its kind.
    REST, its batches and the MQTT adapter all sign through here."""
    key, payload = request.key, request.payload
    if request.kind is SigningKind.HASH:
        return signature_to_dict(await service.sign_hash(principal, key, payload))
    if request.kind is SigningKind.ETH_TRANSACTION:
        return (await service.sign_eth_transaction(principal, key, payload)).to_dict()
    if request.kind is SigningKind.ETH_MESSAGE:
        return (await service.sign_eth_message(principal, key, payload)).to_dict()
    return (await service.sign_eth_typed_data(principal, key, payload)).to_dict()


def error_body(exc: BaseException, metrics: ApiMetrics) -> tuple[int, dict[str, str]]:
    """The HTTP status and ``{code, message, field?}`` of an error, counted in the metrics."""
    wire = wire_error(exc)
    metrics.errors.inc(wire.body["code"])
    return wire.http_status, wire.body


def error_response(
    exc: BaseException, metrics: ApiMetrics, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    status, body = error_body(exc, metrics)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class RestApi:
    """The REST endpoints, bound to one :class:`SigningService`."""

    def __init__(self, service: SigningService, authenticate: Authenticator) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.authenticate = authenticate

    def routes(self) -> list[Route]:
        return [
            Route("/v1/keys", self._wrap(self.keys), methods=["GET", "POST"]),
            Route("/v1/keys/{key}", self._wrap(self.get_key), methods=["GET"]),
            Route("/v1/sign/hash", self._wrap(self.sign_hash), methods=["POST"]),
            Route(
                "/v1/sign/ethereum/transaction",
                self._wrap(self.sign_eth_transaction),
                methods=["POST"],
            ),
            Route("/v1/sign/ethereum/message", self._wrap(self.sign_eth_message), methods=["POST"]),
            Route(
                "/v1/sign/ethereum/typed-data",
                self._wrap(self.sign_eth_typed_data),
                methods=["POST"],
            ),
            Route("/v1/sign/batch", self._wrap(self.sign_batch), methods=["POST"]),
            Route("/healthz", self._wrap(self.healthz, public=True), methods=["GET"]),
            Route("/readyz", self._wrap(self.readyz, public=True), methods=["GET"]),
            Route("/metrics", self._wrap(self.metrics_text, public=True), methods=["GET"]),
            Route("/openapi.json", self._wrap(self.openapi, public=True), methods=["GET"]),
        ]

    def _wrap(
        self, handler: Handler, *, public: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate (unless ``public``: probes and the API description), call, and turn
        any exception into the JSON error answer."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                principal = ANONYMOUS if public else await self.authenticate(request)
                return await handler(request, principal)
            except Exception as exc:
                return error_response(exc, self.metrics)

        return endpoint

    async def _body(self, request: Request, allowed: frozenset[str]) -> dict[str, Any]:
        body = await inputs.read_object(request, self.settings.max_body_bytes)
        check_fields(body, allowed)
        return body

    # keys

    async def keys(self, request: Request, principal: Principal) -> Response:
        if request.method == "POST":
            return await self.create_keys(request, principal)
        return await self.list_keys(request, principal)

    async def create_keys(self, request: Request, principal: Principal) -> Response:
        body = await self._body(request, KEY_FIELDS)
        keys = await self.service.create_keys(
            principal,
            chain=inputs.text(body, "chain"),
            custody=inputs.text(body, "custody"),
            count=inputs.integer(
                body, "count", default=1, low=1, high=self.settings.max_keys_per_request
            ),
            labels=inputs.string_list(body, "labels"),
        )
        return JSONResponse({"keys": [key.to_dict() for key in keys]}, status_code=201)

    async def get_key(self, request: Request, principal: Principal) -> Response:
        info = await self.service.get_key(principal, request.path_params["key"])
        return JSONResponse(info.to_dict())

    async def list_keys(self, request: Request, principal: Principal) -> Response:
        query = request.query_params
        page = await self.service.list_keys(
            principal,
            custody=query.get("custody") or DEFAULT_LIST_CUSTODY,
            chain=query.get("chain") or None,
            label=query.get("label") or None,
            cursor=query.get("cursor") or None,
            limit=inputs.query_integer(
                query.get("limit"), "limit", default=100, low=1, high=MAX_PAGE
            ),
        )
        return JSONResponse(
            {"keys": [key.to_dict() for key in page.keys], "next_cursor": page.next_cursor}
        )

    # signatures

    async def _sign_endpoint(
        self, request: Request, principal: Principal, kind: SigningKind
    ) -> Response:
        body = await inputs.read_object(request, self.settings.max_body_bytes)
        signing = parse_signing_request(kind, body)
        return JSONResponse(await perform_signing(self.service, principal, signing))

    async def sign_hash(self, request: Request, principal: Principal) -> Response:
        return await self._sign_endpoint(request, principal, SigningKind.HASH)

    async def sign_eth_transaction(self, request: Request, principal: Principal) -> Response:
        return await self._sign_endpoint(request, principal, SigningKind.ETH_TRANSACTION)

    async def sign_eth_message(self, request: Request, principal: Principal) -> Response:
        return await self._sign_endpoint(request, principal, SigningKind.ETH_MESSAGE)

    async def sign_eth_typed_data(self, request: Request, principal: Principal) -> Response:
        return await self._sign_endpoint(request, principal, SigningKind.ETH_TYPED_DATA)

    async def sign_batch(self, request: Request, principal: Principal) -> Response:
        """Validate every request first (a malformed one fails the batch with 400), then sign
        them all concurrently; each answer is a result or the error that request met."""
        body = await self._body(request, frozenset({"requests"}))
        items = body.get("requests")
        if not isinstance(items, list) or not 1 <= len(items) <= self.settings.max_batch:
            raise InvalidField(
                f"requests must be a list of 1 to {self.settings.max_batch} requests",
                field="requests",
            )
        parsed = [parse_batch_item(index, item) for index, item in enumerate(items)]
        outcomes = await self.service.sign_batch(
            principal, [(item.kind, item.key, item.payload) for item in parsed]
        )
        return JSONResponse({"results": [self._batch_answer(outcome) for outcome in outcomes]})

    def _batch_answer(self, outcome: SigningResult | Exception) -> dict[str, Any]:
        if isinstance(outcome, Exception):
            return {"error": error_body(outcome, self.metrics)[1]}
        if isinstance(outcome, RecoverableSignature):
            return signature_to_dict(outcome)
        return outcome.to_dict()

    # operations

    async def healthz(self, request: Request, principal: Principal) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request, principal: Principal) -> Response:
        parts = await self.service.readiness()
        ready = all(part["status"] == "ok" for part in parts)
        return JSONResponse({"ready": ready, "parts": parts}, status_code=200 if ready else 503)

    async def metrics_text(self, request: Request, principal: Principal) -> Response:
        return Response(self.metrics.expose(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request, principal: Principal) -> Response:
        return JSONResponse(openapi_document(self.settings))
