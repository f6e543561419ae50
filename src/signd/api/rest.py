"""The REST API under ``/v1``, plus ``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json``.

Bodies are JSON objects; unknown fields are refused so that a misspelt field cannot be
silently ignored. Every error answers ``{"error": {"code", "message", "field"?}}``.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

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
from signd.enclave.protocol import MAX_ATTESTATION_NONCE
from signd.errors import InvalidField
from signd.gate import SigningCall
from signd.gate.inputs import (
    DEFAULT_LIST_CUSTODY,
    KEY_FIELDS,
    check_fields,
    parse_batch_item,
    parse_object,
    parse_signing_request,
)
from signd.gate.interpret import key_list_query
from signd.operations.attestation import Attestation
from signd.operations.signer import signature_json, signature_to_dict

Handler = Callable[[Request, Principal], Awaitable[Response]]
SigningHandler = Callable[[Principal, bytes], Awaitable[Any]]
"""A signing route's work once its caller is known: the body in, the JSON answer out (as
data, or already encoded: :class:`EncodedJson`)."""


class EncodedJson(bytes):
    """An answer already encoded as JSON, sent as it is."""


async def perform_signing(
    service: SigningService, principal: Principal, request: SigningCall
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


def _calls_read(principal: Principal) -> tuple[SigningCall, ...] | None:
    """The request's signing calls as the gate read them from its bytes while authenticating
    it, with the parsers used here (:attr:`~signd.gate.Caller.calls`): reading the body
    again would give the same calls, at the cost of parsing it twice."""
    return None if principal.caller is None else principal.caller.calls


_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


def query_nonce(raw: str | None) -> bytes:
    """The ``nonce`` query parameter of ``/v1/attestation``: 1-64 bytes as hex (``0x``
    optional)."""
    text = raw[2:] if raw is not None and raw[:2] in ("0x", "0X") else raw
    if (
        text is None
        or not 0 < len(text) <= 2 * MAX_ATTESTATION_NONCE
        or len(text) % 2
        or not _HEX_DIGITS.issuperset(text)
    ):
        raise InvalidField(
            f"nonce must be 1-{MAX_ATTESTATION_NONCE} bytes as hex digits", field="nonce"
        )
    return bytes.fromhex(text)


def attestation_to_dict(attested: Attestation) -> dict[str, Any]:
    """The answer of ``/v1/attestation``: the raw document, what it says, and the verdict."""
    payload = attested.payload
    verified: dict[str, Any] = {
        "ok": attested.verified,
        "root": attested.root,
        "pinned_pcr0": [pin.hex() for pin in attested.pinned_pcr0],
    }
    if attested.problem is not None:
        verified["error"] = attested.problem.to_dict()
    return {
        "document": base64.b64encode(attested.document).decode(),
        "pcrs": {str(index): value.hex() for index, value in sorted(payload.pcrs.items())},
        "user_data": payload.user_data.hex() if payload.user_data is not None else None,
        "nonce": payload.nonce.hex() if payload.nonce is not None else None,
        "module_id": payload.module_id,
        "timestamp": payload.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "verified": verified,
    }


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


_JSON_HEADERS: Final = (b"content-type", b"application/json")


def encode_json(content: Any) -> bytes:
    """``content`` as :class:`~starlette.responses.JSONResponse` encodes it."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


async def send_json(send: Send, status: int, content: Any) -> None:
    """Answer with ``content`` as JSON, encoded as :class:`~starlette.responses.JSONResponse`
    encodes it."""
    body = content if isinstance(content, EncodedJson) else encode_json(content)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode("latin-1")), _JSON_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SigningEndpoint:
    """A REST signing route as a plain ASGI app: the body is read off the ASGI messages and
    the answer sent as one JSON body, without Starlette's request and response objects.
    Signing routes carry nearly all the load, and those objects cost as much as the gate's
    own work; authentication, the gate and the error answers are the same as everywhere."""

    def __init__(self, api: RestApi, handler: SigningHandler) -> None:
        self.api = api
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.api
        try:
            # Authentication comes first, as on every route: a caller the rate limits refuse
            # is answered before its body is read. It reads the body and keeps it.
            principal = await api.authenticate(Request(scope, receive))
            settings = api.settings
            body = await inputs.receive_body(
                scope, receive, settings.max_body_bytes, settings.body_timeout
            )
            status, answer = 200, await self.handler(principal, body)
        except Exception as exc:
            status, error = error_body(exc, api.metrics)
            answer = {"error": error}
        await send_json(send, status, answer)


class RestApi:
    """The REST endpoints, bound to one :class:`SigningService`."""

    def __init__(self, service: SigningService, authenticate: Authenticator) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.authenticate = authenticate

    def routes(self) -> list[Route]:
        return [  # the signing routes first: Starlette tries routes in order
            self._signing_route("/v1/sign/hash", SigningKind.HASH),
            self._signing_route("/v1/sign/ethereum/transaction", SigningKind.ETH_TRANSACTION),
            self._signing_route("/v1/sign/ethereum/message", SigningKind.ETH_MESSAGE),
            self._signing_route("/v1/sign/ethereum/typed-data", SigningKind.ETH_TYPED_DATA),
            Route("/v1/sign/batch", SigningEndpoint(self, self.sign_batch), methods=["POST"]),
            Route("/v1/keys", self._wrap(self.keys), methods=["GET", "POST"]),
            Route("/v1/keys/{key}", self._wrap(self.get_key), methods=["GET"]),
            Route("/v1/attestation", self._wrap(self.attestation, public=True), methods=["GET"]),
            Route("/healthz", self._wrap(self.healthz, public=True), methods=["GET"]),
            Route("/readyz", self._wrap(self.readyz, public=True), methods=["GET"]),
            Route("/metrics", self._wrap(self.metrics_text, public=True), methods=["GET"]),
            Route("/openapi.json", self._wrap(self.openapi, public=True), methods=["GET"]),
        ]

    def _wrap(
        self, handler: Handler, *, public: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate (unless ``public``: probes, the API description and the enclave's
        attestation, all public information), call, and turn any exception into the JSON error
        answer."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                principal = ANONYMOUS if public else await self.authenticate(request)
                return await handler(request, principal)
            except Exception as exc:
                return error_response(exc, self.metrics)

        return endpoint

    async def _body(self, request: Request, allowed: frozenset[str]) -> dict[str, Any]:
        body = await inputs.read_object(
            request, self.settings.max_body_bytes, self.settings.body_timeout
        )
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
        inputs.refuse_query_string(request.scope)
        info = await self.service.get_key(principal, request.path_params["key"])
        return JSONResponse(info.to_dict())

    async def list_keys(self, request: Request, principal: Principal) -> Response:
        query = key_list_query(request.scope.get("query_string", b"").decode("latin-1"))
        page = await self.service.list_keys(
            principal,
            custody=query.custody or DEFAULT_LIST_CUSTODY,
            chain=query.chain,
            label=query.label,
            cursor=query.cursor,
            limit=query.limit,
        )
        return JSONResponse(
            {"keys": [key.to_dict() for key in page.keys], "next_cursor": page.next_cursor}
        )

    # signatures

    def _signing_route(self, path: str, kind: SigningKind) -> Route:
        async def sign(principal: Principal, body: bytes) -> dict[str, Any] | EncodedJson:
            read = _calls_read(principal)
            if read is not None and len(read) == 1 and read[0].kind is kind:
                signing = read[0]
            else:
                signing = parse_signing_request(kind, parse_object(body))
            if kind is SigningKind.HASH:  # the busiest answer, written out directly
                made = await self.service.sign_hash(principal, signing.key, signing.payload)
                return EncodedJson(signature_json(made).encode())
            return await perform_signing(self.service, principal, signing)

        return Route(path, SigningEndpoint(self, sign), methods=["POST"])

    async def sign_batch(self, principal: Principal, body: bytes) -> EncodedJson:
        """Validate every request first (a malformed one fails the batch with 400), then sign
        them all concurrently; each answer is a result or the error that request met."""
        read = _calls_read(principal)
        if read is not None and 1 <= len(read) <= self.settings.max_batch:
            calls: Sequence[SigningCall] = read
        else:
            calls = self._parse_batch(body)
        outcomes = await self.service.sign_batch(principal, calls)
        answers = ",".join(map(self._batch_answer, outcomes))
        return EncodedJson(f'{{"results":[{answers}]}}'.encode())

    def _parse_batch(self, body: bytes) -> list[SigningCall]:
        document = parse_object(body)
        check_fields(document, frozenset({"requests"}))
        items = document.get("requests")
        if not isinstance(items, list) or not 1 <= len(items) <= self.settings.max_batch:
            raise InvalidField(
                f"requests must be a list of 1 to {self.settings.max_batch} requests",
                field="requests",
            )
        return [parse_batch_item(index, item) for index, item in enumerate(items)]

    def _batch_answer(self, outcome: SigningResult | Exception) -> str:
        """One result of a batch as JSON text (a hash signature's written out directly: a
        large batch is mostly these)."""
        if isinstance(outcome, RecoverableSignature):
            return signature_json(outcome)
        if isinstance(outcome, Exception):
            answer = {"error": error_body(outcome, self.metrics)[1]}
        else:
            answer = outcome.to_dict()
        return encode_json(answer).decode()

    # attestation

    async def attestation(self, request: Request, principal: Principal) -> Response:
        """A fresh attestation document of the enclave for the caller's nonce, verified here
        first (the caller verifies it again: this host is not trusted)."""
        attested = await self.service.attestation(query_nonce(request.query_params.get("nonce")))
        return JSONResponse(attestation_to_dict(attested), headers={"cache-control": "no-store"})

    # operations

    async def healthz(self, request: Request, principal: Principal) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request, principal: Principal) -> Response:
        parts = await self.service.readiness()
        ready = all(part["status"] == "ok" for part in parts)
        answer: dict[str, Any] = {"ready": ready, "parts": parts}
        reload = self.service.reload_status()
        if reload is not None:
            answer["reload"] = reload
        return JSONResponse(answer, status_code=200 if ready else 503)

    async def metrics_text(self, request: Request, principal: Principal) -> Response:
        return Response(self.metrics.expose(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request, principal: Principal) -> Response:
        return JSONResponse(openapi_document(self.settings))
