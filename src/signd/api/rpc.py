"""Ethereum JSON-RPC 2.0 at ``POST /`` and ``POST /rpc``, so web3.py and ethers.js can use
signd as their node.

signd serves the account and signing methods itself (:data:`SIGND_METHODS`); with a
downstream node every other method is forwarded to it, except signing and account methods of
the node itself (:data:`NEVER_FORWARDED`), so that a node with unlocked accounts is never
asked to sign. Errors follow JSON-RPC 2.0: -32700 parse error, -32600 invalid request,
-32601 method not found, -32602 invalid params (signd's ``invalid_*`` errors), -32603
internal error, and -32001..-32099 for signd's other errors, each with
``data: {"code", "field"?}``. The HTTP status is 200 whenever a JSON-RPC request was read, a
downstream node that is down included (-32006 ``dependency_unavailable``). An HTTP request
refused as a whole before that (a query string, a body too large or too slow, no valid
credentials) keeps the HTTP status of its error, with ``"id": null``; but one whose
authentication meets a dependency failure, or that is stopped at shutdown, is answered as the
JSON-RPC request(s) its body holds: a valid batch an array, that error for each member, and
a single request that error with its id (HTTP 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from signd.api.deadlines import within
from signd.api.downstream import Downstream
from signd.api.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    DownstreamError,
    WireError,
    wire_error,
)
from signd.api.inputs import body_read, read_body
from signd.api.service import Authenticator, Principal, SigningService
from signd.chains.ethereum import SignedTransaction
from signd.errors import DependencyUnavailable, InvalidRequest, SigndError, UnsupportedOperation
from signd.gate import SigningCall, SigningResult
from signd.gate.inputs import (
    RPC_SIGNING_METHODS,
    is_rpc_request,
    parse_json,
    positional,
    rpc_signing_call,
    valid_rpc_id,
)
from signd.gate.operations import MessageSignature

Method = Callable[[Principal, object], Awaitable[Any]]

NEVER_FORWARDED: Final = ("eth_sign", "personal_", "account_", "clef_", "eth_sendTransaction")
"""Method-name prefixes that are never sent to the downstream node, whose own keys must not
sign anything on signd's behalf."""

BATCH_CONCURRENCY: Final = 32
"""The most requests of one batch answered at once. JSON-RPC 2.0 lets a server answer a
batch's requests concurrently: their signatures then share audit writes instead of waiting for
one each (ethers.js batches by default), while a batch of forwarded calls still opens few
connections to the node. Answers keep the batch's order; decisions need not (see API.md)."""

MESSAGE_METHODS: Final = frozenset({"eth_sign", "personal_sign", "eth_signTypedData_v4"})
"""The methods whose members of a batch that signs nothing else are signed in one gate call,
in the batch's order, as the items of a REST batch are (a key's messages are one decision and
one audit record)."""


@dataclass(slots=True)
class _Turns:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SenderTurns:
    """``eth_sendTransaction``'s of one sender in turn (each fills its nonce from the node's
    pending count, so two at once would take the same one). A send waits at most ``wait``
    seconds for the one before it, and a sender's lock is forgotten once none of its sends is
    left: a caller naming ever new senders does not grow it."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turns] = {}

    def __len__(self) -> int:
        """Senders with a send in flight or waiting."""
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, sender: str, wait: float) -> AsyncIterator[None]:
        """Hold ``sender``'s turn for the block; DependencyUnavailable after ``wait`` s."""
        turns = self._turns.get(sender)
        if turns is None:
            turns = self._turns[sender] = _Turns()
        turns.users += 1
        try:
            try:
                async with within(wait):
                    await turns.lock.acquire()
            except TimeoutError:
                raise DependencyUnavailable(
                    f"another eth_sendTransaction from {sender} has been under way for over "
                    f"{wait:g} s (the downstream node is slow): try again"
                ) from None
            try:
                yield
            finally:
                turns.lock.release()
        finally:
            turns.users -= 1
            if not turns.users:
                del self._turns[sender]


class MethodNotFound(Exception):
    """No such JSON-RPC method here (and none to forward to)."""


def geth_transaction(signed: SignedTransaction) -> dict[str, Any]:
    """``eth_signTransaction``'s answer as geth gives it: ``{"raw", "tx"}``."""
    decoded = signed.to_dict(decoded=True)
    tx = dict(decoded["transaction"])
    tx["input"] = tx.pop("data")
    tx |= decoded["signature"]
    if signed.transaction.TYPE != 0:
        tx["yParity"] = tx["v"]
    tx["hash"] = decoded["hash"]
    return {"raw": decoded["raw_transaction"], "tx": tx}


def _response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error(request_id: Any, error: Mapping[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": dict(error)}


def _request_refusal(wire: WireError) -> dict[str, Any]:
    """The JSON-RPC error for an HTTP request refused as a whole, before any JSON-RPC request
    was read from it (a query string, a body too large or too slow, oversized credentials):
    a bad request is -32600 invalid request there, not -32602 invalid params, as no params
    were read to be invalid. Other refusals (-32010 unauthenticated, -32005 rate limited)
    keep their code."""
    error = wire.rpc_error()
    if error["code"] == INVALID_PARAMS:
        error["code"] = INVALID_REQUEST
    return error


def _batch_response(answers: list[dict[str, Any] | None]) -> Response:
    """A batch's answers without its notifications' (none); HTTP 204 when none is left."""
    replies = [answer for answer in answers if answer is not None]
    return JSONResponse(replies) if replies else Response(status_code=204)


def _message_result(outcome: SigningResult | Exception) -> str:
    """A message method's answer (``eth_sign``, ``personal_sign``, ``eth_signTypedData_v4``):
    the 65-byte signature in hex; an error is raised."""
    if isinstance(outcome, Exception):
        raise outcome
    assert isinstance(outcome, MessageSignature)
    return "0x" + outcome.signature.hex()


class JsonRpcApi:
    """The JSON-RPC endpoint, bound to one :class:`SigningService` and an optional node."""

    def __init__(
        self,
        service: SigningService,
        authenticate: Authenticator,
        downstream: Downstream | None,
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.authenticate = authenticate
        self.downstream = downstream
        self.methods: dict[str, Method] = {
            "eth_accounts": self.eth_accounts,
            "eth_requestAccounts": self.eth_accounts,
            "eth_chainId": self.eth_chain_id,
            "eth_sign": self.eth_sign,
            "personal_sign": self.personal_sign,
            "eth_signTransaction": self.eth_sign_transaction,
            "eth_signTypedData_v4": self.eth_sign_typed_data_v4,
            "eth_sendTransaction": self.eth_send_transaction,
        }
        self._sender_turns = SenderTurns()

    def routes(self) -> list[Route]:
        async def root(request: Request) -> Response:
            return await self.endpoint(request)

        return [
            Route("/", root, methods=["POST"], name="jsonrpc_root"),
            Route("/rpc", self.endpoint, methods=["POST"], name="jsonrpc"),
        ]

    async def endpoint(self, request: Request) -> Response:
        try:
            principal = await self.authenticate(request)
            body = await read_body(
                request, self.settings.max_body_bytes, self.settings.body_timeout
            )
        except DependencyUnavailable as exc:
            return await self._unavailable(request, exc)
        except Exception as exc:
            return self.refusal(exc)
        try:
            message = parse_json(body)
        except InvalidRequest as exc:
            error = {"code": PARSE_ERROR, "message": f"parse error: {exc.message}"}
            return JSONResponse(_error(None, error))
        if isinstance(message, list):
            if not 1 <= len(message) <= self.settings.max_batch:
                return JSONResponse(
                    _error(
                        None,
                        {
                            "code": INVALID_REQUEST,
                            "message": f"a batch holds 1 to {self.settings.max_batch} requests",
                        },
                    )
                )
            request.state.rpc_methods = [self._method_label(item) for item in message]
            answers = await self._answer_all(principal, message)
            return _batch_response(answers)
        request.state.rpc_methods = [self._method_label(message)]
        answer = await self.call(principal, message)
        return JSONResponse(answer) if answer is not None else Response(status_code=204)

    def refusal(self, exc: Exception, request_id: Any = None) -> JSONResponse:
        """The answer to an HTTP request refused as a whole (:func:`_request_refusal`), with
        ``request_id`` (null unless the JSON-RPC request it refuses was read)."""
        wire = wire_error(exc)
        self.metrics.errors.inc(wire.body["code"])
        refused = _error(request_id, _request_refusal(wire))
        return JSONResponse(refused, status_code=wire.http_status)

    def unavailable(self, scope: Scope, exc: DependencyUnavailable) -> Response:
        """The answer to a request that ``exc`` stopped before it was answered: a dependency
        failed while it was authenticated (the enclave that authenticates it, and performs a
        batch of messages in the same round trip, down or slow), or signd stopped it at
        shutdown. Its body, if it was read, says what was asked: a valid batch is answered
        as JSON-RPC 2.0 answers a batch, an array, that error for each member with an id
        (-32600 for a member that is no request, nothing for a notification), HTTP 200 as for
        any request read; a single request gets that error with its id, HTTP 503 (a
        notification or anything else, ``"id": null``: :meth:`refusal`)."""
        body = body_read(scope)
        try:
            message = None if body is None else parse_json(body)
        except SigndError:
            message = None
        if isinstance(message, list) and 1 <= len(message) <= self.settings.max_batch:
            state = scope.setdefault("state", {})
            state["rpc_methods"] = [self._method_label(item) for item in message]
            return _batch_response([self._failed(item, exc) for item in message])
        if isinstance(message, dict) and is_rpc_request(message):
            return self.refusal(exc, message.get("id"))
        return self.refusal(exc)

    async def _unavailable(self, request: Request, exc: DependencyUnavailable) -> Response:
        """:meth:`unavailable`, once the body is read (if it can be)."""
        with suppress(SigndError):
            await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout)
        return self.unavailable(request.scope, exc)

    async def _answer_all(self, principal: Principal, items: list[Any]) -> list[Any]:
        """Each item's answer, in order, :data:`BATCH_CONCURRENCY` of them at a time (each
        started in the batch's order), its messages signed first (:meth:`_sign_messages`)."""
        made = await self._sign_messages(principal, items)
        slots = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def answer(index: int, item: object) -> dict[str, Any] | None:
            async with slots:
                return await self.call(principal, item, made.get(index))

        return list(await asyncio.gather(*(answer(i, item) for i, item in enumerate(items))))

    async def _sign_messages(
        self, principal: Principal, items: list[Any]
    ) -> dict[int, SigningResult | Exception]:
        """When every member that signs is one of :data:`MESSAGE_METHODS`: those whose params
        read, signed in one gate call in the batch's order, each one's result or error by its
        place (a member whose params do not read is left to :meth:`call`, which answers its
        error). Otherwise none: each member signs as it is answered."""
        signing = {
            index: item
            for index, item in enumerate(items)
            if isinstance(item, dict)
            and is_rpc_request(item)
            and item["method"] in RPC_SIGNING_METHODS
        }
        if any(item["method"] not in MESSAGE_METHODS for item in signing.values()):
            return {}
        calls: dict[int, SigningCall] = {}
        for index, item in signing.items():
            try:
                calls[index] = rpc_signing_call(item["method"], item.get("params"))
            except SigndError:
                continue
        if len(calls) < 2:
            return {}
        outcomes = await self.service.sign_batch(principal, list(calls.values()))
        return dict(zip(calls, outcomes, strict=True))

    def _method_label(self, item: object) -> str:
        """A bounded name for logs and metrics: signd's methods by name, others 'other'."""
        method = item.get("method") if isinstance(item, dict) else None
        return method if isinstance(method, str) and method in self.methods else "other"

    async def call(
        self,
        principal: Principal,
        item: object,
        made: SigningResult | Exception | None = None,
    ) -> dict[str, Any] | None:
        """Answer one request object; ``None`` for a notification (no ``id``). ``made``: the
        outcome of a message member already signed with its batch."""
        if not isinstance(item, dict) or not is_rpc_request(item):
            return self._invalid(item)
        request_id = item.get("id")
        notification = "id" not in item
        method: str = item["method"]
        label = self._method_label(item)
        try:
            handler = self.methods.get(method)
            if made is not None:
                answer = _response(request_id, _message_result(made))
            elif handler is not None:
                answer = _response(request_id, await handler(principal, item.get("params")))
            elif self.downstream is not None and not method.startswith(NEVER_FORWARDED):
                answer = await self.downstream.forward(item)
            else:
                raise MethodNotFound()
        except MethodNotFound as exc:
            self.metrics.rpc_calls.inc(label, "error")
            message = str(exc) or f"the method {method} does not exist/is not available"
            answer = _error(request_id, {"code": METHOD_NOT_FOUND, "message": message})
        except DownstreamError as exc:
            self.metrics.rpc_calls.inc(label, "error")
            self.metrics.errors.inc(exc.code)
            answer = _error(request_id, exc.rpc_error)
        except Exception as exc:
            answer = self._failure(request_id, label, exc)
        else:
            self.metrics.rpc_calls.inc(label, "error" if "error" in answer else "ok")
        return None if notification else answer

    def _invalid(self, item: object) -> dict[str, Any]:
        """The answer to a batch item or body that is no JSON-RPC 2.0 request."""
        self.metrics.rpc_calls.inc("other", "invalid")
        request_id = item.get("id") if isinstance(item, dict) else None
        return _error(
            request_id if valid_rpc_id(request_id) else None,
            {"code": INVALID_REQUEST, "message": "invalid JSON-RPC 2.0 request"},
        )

    def _failure(self, request_id: Any, label: str, exc: Exception) -> dict[str, Any]:
        """``exc`` as the error answer to the request ``request_id``, counted."""
        self.metrics.rpc_calls.inc(label, "error")
        wire = wire_error(exc)
        self.metrics.errors.inc(wire.body["code"])
        return _error(request_id, wire.rpc_error())

    def _failed(self, item: object, exc: Exception) -> dict[str, Any] | None:
        """The answer to a batch item that could not be served because of ``exc``."""
        if not isinstance(item, dict) or not is_rpc_request(item):
            return self._invalid(item)
        answer = self._failure(item.get("id"), self._method_label(item), exc)
        return answer if "id" in item else None

    # accounts and chain

    async def eth_accounts(self, principal: Principal, params: object) -> list[str]:
        positional(params, 0, 0, "eth_accounts")
        return await self.service.ethereum_accounts(principal)

    async def eth_chain_id(self, principal: Principal, params: object) -> str:
        positional(params, 0, 0, "eth_chainId")
        if self.settings.chain_id is not None:
            return hex(self.settings.chain_id)
        if self.downstream is not None:
            return hex(await self.downstream.chain_id())
        raise UnsupportedOperation(
            "no chain id: configure [api] chain_id or start signd with --downstream"
        )

    # signing

    async def eth_sign(self, principal: Principal, params: object) -> str:
        """geth's eth_sign: EIP-191 personal message over the data bytes."""
        call = rpc_signing_call("eth_sign", params)
        return _message_result(
            await self.service.sign_eth_message(principal, call.key, call.payload)
        )

    async def personal_sign(self, principal: Principal, params: object) -> str:
        """personal_sign(data, address[, password]): the password is not used by signd."""
        call = rpc_signing_call("personal_sign", params)
        return _message_result(
            await self.service.sign_eth_message(principal, call.key, call.payload)
        )

    async def eth_sign_typed_data_v4(self, principal: Principal, params: object) -> str:
        call = rpc_signing_call("eth_signTypedData_v4", params)
        return _message_result(
            await self.service.sign_eth_typed_data(principal, call.key, call.payload)
        )

    async def eth_sign_transaction(self, principal: Principal, params: object) -> dict[str, Any]:
        transaction = rpc_signing_call("eth_signTransaction", params).payload
        if self.downstream is not None:
            transaction = await self.downstream.fill_transaction(transaction)
        signed = await self.service.sign_eth_transaction(
            principal, transaction["from"], transaction
        )
        return geth_transaction(signed)

    async def eth_send_transaction(self, principal: Principal, params: object) -> Any:
        """Fill from the node, sign, and submit with eth_sendRawTransaction."""
        if self.downstream is None:
            raise MethodNotFound(
                "eth_sendTransaction needs a downstream node (signd serve --downstream)"
            )
        transaction = rpc_signing_call("eth_sendTransaction", params).payload
        sender = transaction["from"].lower()
        async with self._sender_turns.turn(sender, self.settings.downstream_timeout):
            filled = await self.downstream.fill_transaction(transaction)
            signed = await self.service.sign_eth_transaction(principal, filled["from"], filled)
            return await self.downstream.call("eth_sendRawTransaction", ["0x" + signed.raw.hex()])
