"""The gatekeeper in the API's two seams: :class:`~signd.gate.Gatekeeper` (in this process)
or :class:`~signd.api.enclave_gatekeeper.EnclaveGatekeeper` (the gate runs in the enclave);
both are a :class:`Keeper`.

- :func:`gatekeeper_authenticator` — the ``authenticate`` seam: the request as received
  (method, target with its query, raw body, auth headers) goes to
  :meth:`~signd.gate.Gatekeeper.authenticate`; an MQTT message arrives here as
  ``POST /mqtt/<topic>`` with the auth headers from its user properties or ``auth`` object.
- :class:`GatekeeperGate` — the ``gate`` seam: keys and signatures go through the gatekeeper
  with the authenticated caller.

Only the auth headers are handed over (``Authorization`` and ``X-Signd-*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio.to_thread
from starlette.requests import Request

from signd.api import inputs
from signd.api.service import Authenticator, Principal, Runner, gated, gated_async
from signd.api.settings import ApiSettings
from signd.custody.base import KeyInfo, KeyPage
from signd.gate import Caller, GateRequest, Signed, SigningCall, SigningKind, Unauthenticated

AUTH_HEADER_PREFIX = "x-signd-"
SIGN_PREFIX = "/v1/sign/"
"""The REST signing routes, whose calls a gate may perform while authenticating."""


class Keeper(Protocol):
    """What the seams need of a gatekeeper; blocking, thread-safe."""

    authenticates_inline: bool
    """True when :meth:`authenticate` needs no I/O but deferrable audit appends, so that the
    service may call it on the event loop (:func:`~signd.api.service.gated`)."""

    def authenticate(self, request: GateRequest) -> Caller: ...

    def signs_inline(self, calls: Sequence[SigningCall]) -> bool:
        """True when :meth:`sign` of ``calls`` needs no I/O but deferrable audit appends."""
        ...

    def create_keys(
        self, caller: Caller, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]: ...

    def get_key(self, caller: Caller, ref: str) -> KeyInfo: ...

    def list_keys(
        self,
        caller: Caller,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage: ...

    def sign(self, caller: Caller, calls: Sequence[SigningCall]) -> list[Signed | Exception]: ...

    def reload(self) -> list[str]:
        """Re-read the clients and policy files; the problems (the old ones stay)."""
        ...

    def close(self) -> None: ...


def request_target(request: Request) -> str:
    """The path with its query string, exactly as sent (what a request signature covers)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def auth_headers(request: Request) -> dict[str, str]:
    return {
        name: value
        for name, value in request.headers.items()
        if name == "authorization" or name.startswith(AUTH_HEADER_PREFIX)
    }


def gatekeeper_authenticator(gatekeeper: Keeper, settings: ApiSettings) -> Authenticator:
    """The ``authenticate`` seam over ``gatekeeper``; bodies over ``max_body_bytes`` get 413."""

    inline = gatekeeper.authenticates_inline
    authenticate_async = getattr(gatekeeper, "authenticate_async", None)
    run = anyio.to_thread.run_sync
    # What a gate in another process may perform along with authenticating a REST signing
    # request (one round trip): signatures the service cannot refuse after authentication.
    # Not with a per-client rate limit, which takes its token only once the client is known.
    perform = (
        frozenset()
        if settings.rate_limit
        else frozenset(SigningKind)
        - (frozenset() if settings.allow_blind_signing else {SigningKind.HASH})
    )

    async def authenticate(request: Request) -> Principal:
        body = await inputs.read_body(request, settings.max_body_bytes)
        received = GateRequest(request.method, request_target(request), body, auth_headers(request))
        if authenticate_async is not None:
            kinds = perform if request.scope["path"].startswith(SIGN_PREFIX) else frozenset()
            caller: Caller = await gated_async(authenticate_async, received, run, kinds)
        else:
            caller = await gated(inline, run, gatekeeper.authenticate, received)
        return Principal(caller.client_id, caller)

    return authenticate


@dataclass(frozen=True, slots=True)
class GatekeeperGate:
    """The ``gate`` seam over ``gatekeeper``: refuses a principal it did not authenticate."""

    gatekeeper: Keeper

    @staticmethod
    def _caller(principal: Principal) -> Caller:
        if principal.caller is None:
            raise Unauthenticated("the request was not authenticated")
        return principal.caller

    def signs_inline(self, principal: Principal, calls: Sequence[SigningCall]) -> bool:
        return principal.caller is not None and self.gatekeeper.signs_inline(calls)

    def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        return self.gatekeeper.create_keys(
            self._caller(principal), chain=chain, custody=custody, count=count, labels=labels
        )

    def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        return self.gatekeeper.get_key(self._caller(principal), ref)

    def list_keys(
        self,
        principal: Principal,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage:
        return self.gatekeeper.list_keys(
            self._caller(principal),
            custody=custody,
            chain=chain,
            label=label,
            cursor=cursor,
            limit=limit,
        )

    def sign(self, principal: Principal, calls: Sequence[SigningCall]) -> list[Signed | Exception]:
        return self.gatekeeper.sign(self._caller(principal), calls)

    async def sign_async(
        self, principal: Principal, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        """:meth:`sign` without a thread where none is needed: the enclave's gate is awaited,
        and the in-process gate runs on the event loop when :meth:`signs_inline`. Audit
        appends are deferred to the caller (:func:`~signd.api.service.gated_async`)."""
        caller = self._caller(principal)
        sign_async = getattr(self.gatekeeper, "sign_async", None)
        if sign_async is not None:
            outcomes: list[Signed | Exception] = await sign_async(caller, calls, run)
            return outcomes
        if self.gatekeeper.signs_inline(calls):
            return self.gatekeeper.sign(caller, calls)
        signed: list[Signed | Exception] = await run(self.gatekeeper.sign, caller, calls)
        return signed
