"""The service between the wire and :class:`~signd.operations.Signer`.

Every request goes through the same steps: the caller is turned into a :class:`Principal`
(the authentication seam), and every key and signing call goes through the
:class:`SigningGate` (the authorisation seam), run in a bounded thread pool. REST, JSON-RPC
and MQTT share this class, so they cannot drift apart.

``signd serve`` plugs the :class:`~signd.gate.Gatekeeper` into both seams
(:mod:`signd.api.gatekeeping`). Unit tests of routes use :func:`allow_anonymous_for_tests`
with :class:`UngatedSigner`: no authentication and no policy at all.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol, TypeVar, cast

import anyio
import anyio.to_thread
from starlette.requests import Request

from signd.api.errors import wire_error
from signd.api.gathering import Gathering
from signd.api.loops import PerLoop
from signd.api.metrics import ApiMetrics
from signd.api.settings import ApiSettings
from signd.audit.log import DeferredAppends, FileAuditLog, deferring_appends
from signd.auth.reload import ReloadStatus
from signd.chains.ethereum import SignedTransaction
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import KeyInfo, KeyPage
from signd.errors import DependencyUnavailable
from signd.gate import Caller, Signed, SigningCall, SigningKind, SigningResult
from signd.gate.interpret import DEFAULT_LIMITS, Limits
from signd.gate.keeper import each_alone, switch_refusal
from signd.gate.operations import Runner
from signd.operations import Signer
from signd.operations.attestation import Attestation, AttestationNotConfigured, EnclaveAttestor
from signd.operations.signer import MessageSignature

T = TypeVar("T")

__all__ = ["SigningKind", "SigningResult"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``name`` for logs, and the authenticated :class:`~signd.gate.Caller`
    when the gatekeeper authenticated the request (``None`` in the no-authentication mode)."""

    name: str
    caller: Caller | None = None


ANONYMOUS = Principal("anonymous")

Authenticator = Callable[[Request], Awaitable[Principal]]
"""Turns a request into its principal, or raises :class:`~signd.errors.AccessDenied`."""


async def allow_anonymous_for_tests(request: Request) -> Principal:
    """No authentication: every caller is the same principal. For unit tests of routes only;
    ``signd serve`` always authenticates."""
    return ANONYMOUS


class _LoopDelivery:
    """Completes futures of one event loop from other threads, with one wake-up of the loop
    for all the completions that pile up meanwhile (the audit writer ends whole groups)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weak: the loop keys it in _delivery
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._to_wake: list[FileAuditLog] = []
        """Audit logs to wake at the end of this pass of the loop (loop thread only)."""

    def wake_soon(self, log: FileAuditLog) -> None:
        """Wake ``log``'s writer once the requests of this pass of the loop have submitted
        their records, so that they share one write (call from the loop's thread)."""
        if log in self._to_wake:
            return
        self._to_wake.append(log)
        loop = self._loop()
        if len(self._to_wake) == 1 and loop is not None:
            loop.call_soon(self._wake_all)

    def _wake_all(self) -> None:
        logs, self._to_wake = self._to_wake, []
        for log in logs:
            log.wake()

    def deliver(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        with self._lock:
            self._ready.append((future, result, error))
            if len(self._ready) > 1:
                return  # a flush is scheduled already
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, result, error in ready:
            if future.done():  # its request was cancelled
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


_delivery: PerLoop[_LoopDelivery] = PerLoop(_LoopDelivery)


class _Countdown:
    """Ends ``future`` once every one of ``count`` submissions has ended: with the first
    error, if any."""

    def __init__(self, count: int, future: asyncio.Future[None], delivery: _LoopDelivery) -> None:
        self._left = count
        self._error: BaseException | None = None
        self._future = future
        self._delivery = delivery
        self._lock = threading.Lock()

    def ended(self, error: BaseException | None) -> None:
        with self._lock:
            self._left -= 1
            if error is not None and self._error is None:
                self._error = error
            if self._left:
                return
        self._delivery.deliver(self._future, None, self._error)


async def durable(appends: DeferredAppends) -> None:
    """Wake the audit logs appended to (once per pass of the event loop, so that one write
    carries the records of every request of the pass) and wait until every deferred append
    is durable; raise the first that failed."""
    if not appends.submissions:
        return
    loop = asyncio.get_running_loop()
    delivery = _delivery(loop)
    for log in appends.logs:
        delivery.wake_soon(log)
    waiter: asyncio.Future[None] = loop.create_future()
    countdown = _Countdown(len(appends.submissions), waiter, delivery)
    for log, submission in appends.submissions:
        log.listen(submission, countdown.ended)
    await waiter


async def gated(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await a gate call with its audit appends deferred (:func:`~signd.audit.log.
    deferring_appends`), then wait until they are durable before returning or raising: the
    result leaves only with its records, and a failed append replaces it (as when the gate
    appends and waits itself). No thread waits for an fsync."""
    with deferring_appends() as appends:
        try:
            result: T = await function(*args)
        except BaseException:
            await durable(appends)
            raise
    await durable(appends)
    return result


class SigningGate(Protocol):
    """Every key and signing call of the service goes through the gate; it raises
    :class:`~signd.errors.AccessDenied` (or a subclass) to refuse.

    The key methods are blocking (the service calls them in its thread pool); signing is
    awaited, so that a gate may sign on the event loop when that needs no I/O, or await an
    enclave, and use ``run`` (the pool) only for what blocks.
    """

    def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]: ...

    def get_key(self, principal: Principal, ref: str) -> KeyInfo: ...

    def list_keys(
        self,
        principal: Principal,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage: ...

    def performed(self, principal: Principal, call: SigningCall) -> Signed | Exception | None:
        """``call``'s outcome when the gate performed it while authenticating the request
        (its audit records durable already) and handing it out needs no I/O; else ``None``,
        and the call is signed."""
        ...

    async def sign_async(
        self, principal: Principal, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        """Sign ``calls`` in order; each one's result or the error it met."""
        ...

    async def sign_each_async(
        self, requests: Sequence[tuple[Principal, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        """:meth:`sign_async` of each request, each decided and recorded as its own (in one
        gate call where the gate can: the service gathers single signing requests for it,
        :mod:`signd.api.gathering`); a request whose gate call failed as a whole gets that
        error in its place."""
        ...

    def health_checks(self) -> list[tuple[str, Callable[[], None]]]:
        """``/readyz`` parts of the gate itself (its audit log), each a name and a blocking
        check that raises what stops the gate."""
        ...

    def reload_status(self) -> ReloadStatus | None:
        """How the gate's last reload of its clients and policy files went (``None`` for a
        gate without them): ``/readyz`` shows it, the metrics count the outcomes."""
        ...


_SIGNER_METHODS: Final[Mapping[SigningKind, Callable[[Signer, KeyInfo, Any], SigningResult]]] = {
    SigningKind.HASH: Signer.sign_hash,
    SigningKind.ETH_TRANSACTION: Signer.sign_eth_transaction,
    SigningKind.ETH_MESSAGE: Signer.sign_eth_message,
    SigningKind.ETH_TYPED_DATA: Signer.sign_eth_typed_data,
}
_NOT_SIGNED: Final = RuntimeError("not signed")


@dataclass(frozen=True, slots=True)
class UngatedSigner:
    """The gate of the no-authentication mode: straight to the signer, no policy, no audit,
    only the ``allow_blind_signing`` switch. For unit tests of routes (with
    :func:`allow_anonymous_for_tests`) and benchmarks."""

    signer: Signer
    limits: Limits = DEFAULT_LIMITS

    def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        return self.signer.create_keys(chain=chain, custody=custody, count=count, labels=labels)

    def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        return self.signer.get_key(ref)

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
        return self.signer.list_keys(
            custody=custody, chain=chain, label=label, cursor=cursor, limit=limit
        )

    def health_checks(self) -> list[tuple[str, Callable[[], None]]]:
        """None: this gate keeps no audit log."""
        return []

    def reload_status(self) -> ReloadStatus | None:
        """``None``: this gate has no clients or policy files."""
        return None

    def performed(self, principal: Principal, call: SigningCall) -> Signed | Exception | None:
        """``None``: nothing is performed with authentication here."""
        return None

    async def sign_async(
        self, principal: Principal, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        """On the event loop when every key signs in this process without I/O."""
        if all(self.signer.key_is_local(call.key) for call in calls):
            return self.sign(principal, calls)
        signed: list[Signed | Exception] = await run(self.sign, principal, calls)
        return signed

    async def sign_each_async(
        self, requests: Sequence[tuple[Principal, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        """:meth:`sign_async` of each request, concurrently (nothing is shared here)."""
        return await each_alone(self.sign_async, requests, run)

    def sign(self, principal: Principal, calls: Sequence[SigningCall]) -> list[Signed | Exception]:
        """Resolves each distinct key once per call."""
        resolved: dict[str, KeyInfo] = {}
        outcomes: list[Signed | Exception] = []
        for call in calls:
            try:
                refusal = switch_refusal(call.kind, self.limits)
                if refusal is not None:
                    raise refusal
                info = resolved.get(call.key)
                if info is None:
                    info = resolved[call.key] = self.signer.get_key(call.key)
                result = _SIGNER_METHODS[call.kind](self.signer, info, call.payload)
                outcomes.append(Signed(info, result))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


class SigningService:
    """Keys and signatures for the API, off the event loop and counted in the metrics.

    ``allow_blind_signing`` is a server-wide switch the gate applies (and audits): with it
    off, raw-hash requests are refused whoever asks and whatever the policy says.
    ``attestor`` checks the enclave's attestation (``None``: no enclave attests here).
    """

    def __init__(
        self,
        signer: Signer,
        settings: ApiSettings,
        metrics: ApiMetrics,
        gate: SigningGate | None = None,
        attestor: EnclaveAttestor | None = None,
    ) -> None:
        self.signer = signer
        self.settings = settings
        self.metrics = metrics
        self.gate: SigningGate = gate or UngatedSigner(signer, settings.limits())
        self.attestor = attestor
        self._readiness_parts: list[tuple[str, Callable[[], None]]] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._gathering = Gathering(self._gate_sign_each)

    def reset(self) -> None:
        """Forget the thread limiter (it belongs to the event loop that created it)."""
        self._limiter = None

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in the bounded thread pool."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.signing_threads)
        return await anyio.to_thread.run_sync(
            partial(function, *args, **kwargs), limiter=self._limiter
        )

    async def through_gate(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A gate call in the thread pool, its audit appends awaited here (:func:`gated`)."""
        return await gated(self.run, partial(function, *args, **kwargs))

    async def _gate_sign(
        self, principal: Principal, calls: Sequence[SigningCall]
    ) -> list[Signed | Exception]:
        return await gated(self.gate.sign_async, principal, calls, self.run)

    async def _gate_sign_each(
        self, requests: Sequence[tuple[Principal, Sequence[SigningCall]]]
    ) -> list[list[Signed | Exception] | Exception]:
        return await gated(self.gate.sign_each_async, requests, self.run)

    # keys

    async def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        return await self.through_gate(
            self.gate.create_keys,
            principal,
            chain=chain,
            custody=custody,
            count=count,
            labels=labels,
        )

    async def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        return await self.through_gate(self.gate.get_key, principal, ref)

    async def list_keys(
        self,
        principal: Principal,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage:
        return await self.through_gate(
            self.gate.list_keys,
            principal,
            custody=custody,
            chain=chain,
            label=label,
            cursor=cursor,
            limit=limit,
        )

    async def ethereum_accounts(self, principal: Principal) -> list[str]:
        """The addresses ``eth_accounts`` lists: configured ones, or keys by label, or all."""
        return await self.through_gate(self._ethereum_accounts, principal)

    def _ethereum_accounts(self, principal: Principal) -> list[str]:
        if self.settings.accounts:
            return [self.gate.get_key(principal, ref).address for ref in self.settings.accounts]
        addresses: list[str] = []
        for custody in self.signer.custody_types:
            cursor: str | None = None
            while len(addresses) < self.settings.max_accounts:
                page = self.gate.list_keys(
                    principal,
                    custody=custody,
                    chain="ethereum",
                    label=self.settings.accounts_label,
                    cursor=cursor,
                    limit=min(1000, self.settings.max_accounts - len(addresses)),
                )
                addresses.extend(key.address for key in page.keys)
                cursor = page.next_cursor
                if cursor is None:
                    break
        return addresses

    # signatures

    def _count(self, outcome: Signed | Exception, kind: SigningKind) -> SigningResult | Exception:
        if isinstance(outcome, Exception):
            return outcome
        self.metrics.signatures.inc(outcome.key.chain, outcome.key.custody, kind.value)
        return outcome.result

    async def _sign(self, principal: Principal, kind: SigningKind, key: str, payload: Any) -> Any:
        call = SigningCall(kind, key, payload)
        outcome = self.gate.performed(principal, call)
        if outcome is None:  # signed with the others of this pass of the event loop
            outcome = await self._gathering.sign(principal, call)
        result = self._count(outcome, kind)
        if isinstance(result, Exception):
            raise result
        return result

    async def sign_batch(
        self, principal: Principal, requests: Sequence[SigningCall]
    ) -> list[SigningResult | Exception]:
        """Sign ``requests``; in order, each one's result or the error it met. They go
        through the gate in one call (a key's hash or message signatures in one gate call
        are one decision, sealed as one audit record)."""
        try:
            signed = await self._gate_sign(principal, requests)
        except Exception as exc:  # the audit append failed: every result is withheld
            signed = [exc for _ in requests]
        made = collections.Counter(
            (outcome.key.chain, outcome.key.custody, call.kind)
            for call, outcome in zip(requests, signed, strict=True)
            if not isinstance(outcome, Exception)
        )
        for (chain, custody, kind), count in made.items():
            self.metrics.signatures.inc(chain, custody, kind.value, amount=count)
        return [outcome if isinstance(outcome, Exception) else outcome.result for outcome in signed]

    async def sign_hash(
        self, principal: Principal, key: str, digest: bytes
    ) -> RecoverableSignature:
        return cast(
            RecoverableSignature, await self._sign(principal, SigningKind.HASH, key, digest)
        )

    async def sign_eth_transaction(
        self, principal: Principal, key: str, transaction: Mapping[str, Any]
    ) -> SignedTransaction:
        return cast(
            SignedTransaction,
            await self._sign(principal, SigningKind.ETH_TRANSACTION, key, transaction),
        )

    async def sign_eth_message(
        self, principal: Principal, key: str, message: bytes
    ) -> MessageSignature:
        return cast(
            MessageSignature, await self._sign(principal, SigningKind.ETH_MESSAGE, key, message)
        )

    async def sign_eth_typed_data(
        self, principal: Principal, key: str, document: Mapping[str, Any]
    ) -> MessageSignature:
        return cast(
            MessageSignature,
            await self._sign(principal, SigningKind.ETH_TYPED_DATA, key, document),
        )

    # attestation

    async def attestation(self, nonce: bytes) -> Attestation:
        """A fresh attestation document of the enclave binding ``nonce``, with the host's
        verdict. It runs in the bounded thread pool, which bounds the NSM calls in flight."""
        if self.attestor is None:
            raise AttestationNotConfigured("no custody of this service runs in an enclave")
        return await self.run(self.attestor.attest, nonce)

    # health

    def reload_status(self) -> dict[str, Any] | None:
        """``/readyz``'s ``reload``: the gate's last reload of its clients and policy files
        (a refused one leaves the service ready: the files in force still serve)."""
        status = self.gate.reload_status()
        return None if status is None else status.to_dict()

    def add_readiness_part(self, name: str, check: Callable[[], None]) -> None:
        """Make ``name`` a part of :meth:`readiness`: ``check`` blocks at most briefly and
        raises what makes the service not ready (the MQTT adapter's connection)."""
        self._readiness_parts.append((name, check))

    async def readiness(self) -> list[dict[str, str]]:
        """One entry per configured custody, ``attestation`` when an enclave attests, the
        gate's own (``audit``) and those added (``mqtt``): ``ok``, or ``unavailable`` with the
        reason. The checks run concurrently, so the whole answer comes within
        ``health_timeout``."""
        checks: list[tuple[str, Callable[[], None]]] = [
            (f"custody:{custody}", partial(self._check_custody, custody))
            for custody in self.signer.custody_types
        ]
        if self.attestor is not None:
            checks.append(("attestation", self.attestor.check))
        checks += self.gate.health_checks()
        checks += self._readiness_parts
        parts: list[dict[str, str]] = [{} for _ in checks]

        async def probe(index: int, name: str, check: Callable[[], None]) -> None:
            parts[index] = await self._probe(name, check)

        async with anyio.create_task_group() as group:
            for index, (name, check) in enumerate(checks):
                group.start_soon(probe, index, name, check)
        return parts

    async def _probe(self, name: str, check: Callable[[], None]) -> dict[str, str]:
        """Run one readiness check in a thread, bounded by ``health_timeout``."""
        part = {"part": name, "status": "ok"}
        try:
            with anyio.fail_after(self.settings.health_timeout):
                await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except TimeoutError:
            part |= {
                "status": "unavailable",
                "code": DependencyUnavailable.code,
                "message": f"no answer in {self.settings.health_timeout:g}s",
            }
        except Exception as exc:
            body = wire_error(exc).body
            part |= {"status": "unavailable", "code": body["code"], "message": body["message"]}
        return part

    def _check_custody(self, custody: str) -> None:
        self.signer.backend(custody).check_health()
