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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import anyio.to_thread
from starlette.requests import Request

from signd.api import inputs
from signd.api.errors import HeadersTooLarge, TargetTooLong
from signd.api.service import Authenticator, Principal, gated
from signd.api.settings import ApiSettings
from signd.auth.reload import ReloadRefusal, ReloadStatus
from signd.auth.request_signing import SIGNED_HEADER_PREFIX
from signd.custody.base import KeyInfo, KeyPage
from signd.enclave.gate import MAX_HEADER_SIZE, MAX_HEADERS, MAX_TARGET
from signd.gate import Caller, GateRequest, Signed, SigningCall, SigningKind, Unauthenticated
from signd.gate.operations import Runner

_AUTH_HEADER_PREFIX_BYTES = SIGNED_HEADER_PREFIX.encode("ascii")
SIGN_PREFIX = "/v1/sign/"
"""The REST signing routes, whose calls a gate may perform while authenticating."""
RPC_PATHS: Final = frozenset({"/", "/rpc"})
RPC_PERFORMED: Final = frozenset({SigningKind.ETH_MESSAGE, SigningKind.ETH_TYPED_DATA})
"""The JSON-RPC calls a gate may perform while authenticating: between authentication and
the gate, the host reads their params with the parser the gate reads them with, and nothing
else. Transactions are not among them: the host may fill their fields from its node."""


class Keeper(Protocol):
    """What the seams need of a gatekeeper; thread-safe. Authentication and signing are
    awaited (each gate decides what runs on the event loop and what in ``run``'s thread);
    the rest blocks and the service calls it in its thread pool."""

    def authenticate(self, request: GateRequest) -> Caller: ...

    async def authenticate_async(
        self, request: GateRequest, run: Runner, perform: frozenset[SigningKind] = frozenset()
    ) -> Caller:
        """:meth:`authenticate`; a gate in another process may also perform the request's
        calls of the kinds ``perform`` names, in the same round trip."""
        ...

    def signs_inline(self, calls: Sequence[SigningCall]) -> bool:
        """True when :meth:`sign` of ``calls`` needs no I/O but deferrable audit appends."""
        ...

    def performed(self, caller: Caller, call: SigningCall) -> Signed | Exception | None:
        """``call``'s outcome if it was performed with the authentication and handing it
        out needs no I/O, else ``None``."""
        ...

    async def sign_async(
        self, caller: Caller, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]: ...

    async def sign_each_async(
        self, requests: Sequence[tuple[Caller, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        """:meth:`sign_async` of each request (its caller and calls); a request whose gate
        call failed as a whole gets that error in its place."""
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

    def check_audit(self) -> None:
        """Raise :class:`~signd.errors.DependencyUnavailable` while no record can be stored."""
        ...

    def reload(self) -> ReloadRefusal | None:
        """Re-read the clients and policy files and put both in force, or neither; the
        refusal naming the files refused and why (the old ones stay), or ``None``."""
        ...

    def reload_status(self) -> ReloadStatus:
        """How the last :meth:`reload` went, and the SHA-256 of the files in force."""
        ...

    def close(self) -> None: ...


def request_target(request: Request) -> str:
    """The path with its query string, exactly as sent (what a request signature covers)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def auth_headers(request: Request) -> dict[str, str]:
    """The auth headers, read off the ASGI scope's raw (lower-case) names. A header sent
    more than once has its values joined with ", " (as HTTP combines them), which no
    credential parses: a proxy that reads the first and signd the last would otherwise
    disagree on who is calling."""
    found: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        if name == b"authorization" or name.startswith(_AUTH_HEADER_PREFIX_BYTES):
            text = name.decode("latin-1")
            given = value.decode("latin-1")
            found[text] = f"{found[text]}, {given}" if text in found else given
    return found


def gatekeeper_authenticator(gatekeeper: Keeper, settings: ApiSettings) -> Authenticator:
    """The ``authenticate`` seam over ``gatekeeper``; bodies over ``max_body_bytes`` get 413,
    bodies not in within ``body_timeout`` 408, a query string on a POST route 400."""

    run = anyio.to_thread.run_sync
    # What a gate in another process may perform along with authenticating a REST signing
    # request (one round trip): signatures the service cannot refuse after authentication.
    # Not with a per-client rate limit, which takes its token only once the client is known.
    perform = frozenset() if settings.rate_limit else frozenset(SigningKind)

    async def authenticate(request: Request) -> Principal:
        target, headers = request_target(request), auth_headers(request)
        if len(target) > MAX_TARGET:
            raise TargetTooLong(f"the path and query are over {MAX_TARGET} characters")
        if len(headers) > MAX_HEADERS or any(len(v) > MAX_HEADER_SIZE for v in headers.values()):
            raise HeadersTooLarge(
                f"credentials are at most {MAX_HEADERS} Authorization and X-Signd-* headers"
                f" of {MAX_HEADER_SIZE} characters"
            )
        if request.method == "POST":  # every POST route (the enclave's reading refuses it too)
            inputs.refuse_query_string(request.scope)
        body = await inputs.read_body(request, settings.max_body_bytes, settings.body_timeout)
        received = GateRequest(request.method, target, body, headers)
        path = request.scope["path"]
        kinds = perform if path.startswith(SIGN_PREFIX) else frozenset()
        if path in RPC_PATHS:
            kinds = perform & RPC_PERFORMED
        caller = await gated(gatekeeper.authenticate_async, received, run, kinds)
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

    def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        return self.gatekeeper.create_keys(
            self._caller(principal), chain=chain, custody=custody, count=count, labels=labels
        )

    def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        return self.gatekeeper.get_key(self._caller(principal), ref)

    def health_checks(self) -> list[tuple[str, Callable[[], None]]]:
        """``/readyz``'s ``audit`` part: nothing is signed while the log takes no record."""
        return [("audit", self.gatekeeper.check_audit)]

    def reload_status(self) -> ReloadStatus:
        """``/readyz``'s ``reload``: the gatekeeper's last reload."""
        return self.gatekeeper.reload_status()

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

    def performed(self, principal: Principal, call: SigningCall) -> Signed | Exception | None:
        if principal.caller is None:
            return None
        return self.gatekeeper.performed(principal.caller, call)

    async def sign_async(
        self, principal: Principal, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        return await self.gatekeeper.sign_async(self._caller(principal), calls, run)

    async def sign_each_async(
        self, requests: Sequence[tuple[Principal, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        refused: list[Exception | None] = []
        callers: list[tuple[Caller, Sequence[SigningCall]]] = []
        for principal, calls in requests:
            if principal.caller is None:
                refused.append(Unauthenticated("the request was not authenticated"))
            else:
                refused.append(None)
                callers.append((principal.caller, calls))
        signed = iter(await self.gatekeeper.sign_each_async(callers, run) if callers else [])
        return [next(signed) if refusal is None else refusal for refusal in refused]
