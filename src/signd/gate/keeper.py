"""The :class:`Gatekeeper`: the deny-by-default chain every key and signing request passes.

For each request: authenticate (request signature or bearer token) → scope and key labels →
decode what will be signed and build the :class:`~signd.policy.SigningIntent` from it →
:meth:`~signd.policy.PolicyEngine.check` → sign exactly the approved digest →
:meth:`~signd.policy.PolicyEngine.commit` the spend → seal an audit record (refusals too;
an allowed signing's record carries the spend it committed, so that the windows can be
rebuilt from the log after a restart) and append it before the result is returned.

It knows nothing of HTTP: a request is a :class:`GateRequest` (method, path, raw body, auth
headers), so the same object can run inside the enclave process, where the host hands it
the request as received.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final, NoReturn, Protocol, TypeVar

from signd.auth import ClientsHolder, Principal, RequestVerifier, Scope
from signd.auth.reload import ReloadHistory, ReloadRefusal, ReloadStatus, reload_together
from signd.auth.request_signing import HEADER_CLIENT, HEADER_SIGNATURE, SIGNED_HEADER_PREFIX
from signd.chains import address_deriver
from signd.crypto.secp256k1 import PARALLEL_MIN, RecoverableSignature
from signd.custody.base import KeyInfo, KeyPage, check_labels
from signd.errors import AccessDenied, SigndError
from signd.gate.audit import AuditEntry, AuditTrail, DecisionLog, InForce, RefusalRecords
from signd.gate.errors import (
    BlindSigningDisabled,
    OutOfScope,
    PolicyDenied,
    Unauthenticated,
    rule_of,
    signing_fault,
)
from signd.gate.intents import Prepared, prepare, result_bytes, sha256_hex
from signd.gate.interpret import DEFAULT_LIMITS, Limits
from signd.gate.operations import Runner, Signed, SigningCall, SigningKind
from signd.gate.together import Run, SignTogether, Waiting
from signd.policy import Decision, Operation, Policy, PolicyEngine, PolicyHolder, SigningIntent

log = logging.getLogger("signd.gate")

T = TypeVar("T")

SCOPE_OF: Mapping[SigningKind, Scope] = {
    SigningKind.HASH: Scope.SIGN_HASH,
    SigningKind.ETH_TRANSACTION: Scope.SIGN_TRANSACTION,
    SigningKind.ETH_MESSAGE: Scope.SIGN_MESSAGE,
    SigningKind.ETH_TYPED_DATA: Scope.SIGN_MESSAGE,
}
"""The client scope each kind of signature needs (typed data is a message)."""

OPERATION_OF: Mapping[SigningKind, Operation] = {
    SigningKind.HASH: Operation.SIGN_HASH,
    SigningKind.ETH_TRANSACTION: Operation.SIGN_TRANSACTION,
    SigningKind.ETH_MESSAGE: Operation.SIGN_MESSAGE,
    SigningKind.ETH_TYPED_DATA: Operation.SIGN_TYPED_DATA,
}
THREAD_CHUNK: Final = 250
"""Calls per thread when a gate call must sign in threads (keys not yet in memory, or held
by an HSM or KMS). In memory, the gate signs every call of a gate call at once, on every
core (:func:`~signd.crypto.secp256k1.sign_digests_with`)."""
AUTHENTICATE = "authenticate"
"""The audit ``operation`` of a request refused before its caller was known."""
BEARER = "bearer "
MAX_SHOWN_PATH = 200


class GateCustody(Protocol):
    """The custody the gatekeeper works with; a :class:`~signd.operations.Signer` is one."""

    def get_key(self, ref: str, /) -> KeyInfo:
        """The key with this key id or address, in any custody."""
        ...

    def sign_hash(self, key: KeyInfo, digest: bytes, /) -> RecoverableSignature:
        """Sign a 32-byte digest with ``key`` (low-S, recovery id checked)."""
        ...

    def sign_hashes(
        self, pairs: Sequence[tuple[KeyInfo, bytes]], /
    ) -> list[RecoverableSignature | SigndError]:
        """:meth:`sign_hash` of each pair, in order (on every core when it can); one that
        fails gives its error in its place."""
        ...

    def key_is_local(self, ref: str, /) -> bool:
        """True when signing with ``ref`` needs no I/O (see :meth:`Gatekeeper.signs_inline`)."""
        ...

    def create_keys(
        self, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]: ...

    def list_keys(
        self,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage: ...


@dataclass(frozen=True, slots=True)
class GateRequest:
    """A request as received: what its signature covers, and its auth headers."""

    method: str
    path: str
    """The request target with its query string, exactly as sent."""
    body: bytes = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)
    """Auth headers (names in any case); never logged."""
    _sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        """The body's SHA-256 (hex), computed once: a gate reads it several times."""
        digest = self._sha256
        if digest is None:
            digest = hashlib.sha256(self.body).hexdigest()
            object.__setattr__(self, "_sha256", digest)
        return digest

    def header(self, name: str) -> str | None:
        """The value of the first header called ``name`` (in any case), if any."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: who sent it, and the digest of what was sent.

    ``request`` is the request itself when a gate in another process must be shown it again
    (the enclave re-verifies it for every call it performs)."""

    principal: Principal
    request_sha256: str
    request: GateRequest | None = field(default=None, repr=False, compare=False)
    session: object | None = field(default=None, repr=False, compare=False)
    """What the gate that authenticated the request keeps about it while it is served."""
    calls: tuple[SigningCall, ...] | None = field(default=None, repr=False, compare=False)
    """The signing calls the gate read from the request's bytes while authenticating it
    (with the API's own parsers, :func:`~signd.gate.interpret.interpret`), so that the API
    need not read them again; ``None`` when it read none (or the request is malformed: the
    API's reading then says why)."""

    @property
    def client_id(self) -> str:
        return self.principal.client_id


class Gatekeeper:
    """Authenticates, authorises, signs and audits; thread-safe, blocking.

    ``clients`` and ``policy`` are the holders the verifier and engine read, kept here so
    that :meth:`reload` can re-read their files. A request is authenticated and decided
    under one pair of them (:meth:`in_force`, read as one, kept with its :class:`Caller`).
    """

    def __init__(
        self,
        signer: GateCustody,
        verifier: RequestVerifier,
        engine: PolicyEngine,
        audit: AuditTrail,
        *,
        clients: ClientsHolder | None = None,
        policy: PolicyHolder | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.signer = signer
        self.verifier = verifier
        self.engine = engine
        self.audit = audit
        self.limits = limits
        self.clients = clients
        self.policy = policy
        self._reloads = ReloadHistory()
        self._refusals = RefusalRecords(
            limits.auth_failure_audit_rate, limits.auth_failure_audit_burst
        )
        self._pair_lock = threading.Lock()
        """Held while a reload swaps the files and while :meth:`in_force` reads them."""

    def __repr__(self) -> str:
        return f"Gatekeeper(engine={self.engine!r}, audit={self.audit!r})"

    def close(self) -> None:
        """Close the audit log (the signer belongs to the caller)."""
        self.audit.close()

    def check_audit(self) -> None:
        """Whether the audit log can take records: nothing is signed while it cannot."""
        self.audit.check_health()

    # configuration

    def reload(self) -> ReloadRefusal | None:
        """Re-read the clients and policy files and put both in force, or neither: a bad
        file is refused (and logged) and keeps the other out too, so a pair never validated
        together is never in force. The refusal naming the files refused (``None`` when
        both were put in force); the outcome is kept for :meth:`reload_status`."""
        holders = [holder for holder in (self.clients, self.policy) if holder is not None]
        return self._reloads.run(lambda: reload_together(holders, lock=self._pair_lock))

    def reload_status(self) -> ReloadStatus:
        """How the last reload went, and the SHA-256 of the files in force."""
        return self._reloads.status(
            None if self.clients is None else self.clients.sha256,
            None if self.policy is None else self.policy.sha256,
        )

    # authentication

    def authenticate(self, request: GateRequest) -> Caller:
        """The caller, or :class:`Unauthenticated` (audited as refused). The caller keeps
        the configuration it was authenticated under, for its calls to be decided under."""
        in_force = self.in_force()
        try:
            principal = identify(
                request,
                lambda: self.verifier.verify(
                    request.method,
                    request.path,
                    request.body,
                    request.headers,
                    registry=in_force.clients,
                ),
                partial(self.verifier.verify_bearer, registry=in_force.clients),
            )
        except AccessDenied as exc:
            entries = self._refusals.entries(authentication_refusal(request, exc.message, in_force))
            if entries:
                self.audit.write(entries)
            raise Unauthenticated(exc.message) from None
        return Caller(principal, request.sha256, session=in_force)

    async def authenticate_async(
        self, request: GateRequest, run: Runner, perform: frozenset[SigningKind] = frozenset()
    ) -> Caller:
        """:meth:`authenticate` for an event loop: it is CPU work only here, so it runs on
        the loop (inside :func:`~signd.audit.log.deferring_appends` a refusal's audit append
        is submitted, and the caller awaits it). ``run`` and ``perform`` matter to a gate in
        another process; this one performs nothing ahead."""
        return self.authenticate(request)

    # keys

    def create_keys(
        self, caller: Caller, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        """``keys:create``: the client's scope and labels, then the policy, then custody.
        (Creating a key moves no value, so there is no spend to commit.)

        No key is made while the audit log is known to take no records (503). The keys'
        records are written, durably, once they are made (their ids are known only then):
        if that fails, the caller gets the error and none of their addresses, so no funds
        can reach them, but the keys exist in custody without a record; a warning names
        them (:func:`warn_unrecorded`)."""
        in_force = self._in_force_of(caller)
        base = self._entry(caller, Operation.KEYS_CREATE, in_force, chain=chain)
        wanted = check_labels(labels)
        address_deriver(chain)  # an unknown chain is a bad request, not a policy question
        self._guard(base, lambda: require_scope(caller.principal, Scope.KEYS_CREATE))
        if not caller.principal.may_label(wanted):
            self._refuse(
                base,
                OutOfScope(
                    f"client {caller.client_id!r} may not create keys labelled {list(wanted)}"
                ),
            )
        intent = SigningIntent(caller.client_id, "", wanted, chain, Operation.KEYS_CREATE)
        decision = self.engine.check(intent, policy=in_force.policy)
        if decision.refused:
            self._refuse(base, PolicyDenied(decision.reason, rule=decision.rule), decision.rule)
        self.check_audit()
        keys = self._guard(
            base,
            lambda: self.signer.create_keys(
                chain=chain, custody=custody, count=count, labels=wanted
            ),
            decision.rule,
        )
        try:
            self.audit.write(
                [
                    base
                    | {
                        "decision": "allowed",
                        "reason": decision.reason,
                        "rule": decision.rule,
                        "key_id": key.key_id,
                        "result_sha256": sha256_hex(key.public_key),
                    }
                    for key in keys
                ],
                wait=True,
            )
        except Exception as exc:
            warn_unrecorded(custody, [key.key_id for key in keys], exc)
            raise
        return keys

    def get_key(self, caller: Caller, ref: str) -> KeyInfo:
        """``keys:read``, and only a key the client may use."""
        base = self._entry(caller, Scope.KEYS_READ, self._in_force_of(caller))
        self._guard(base, lambda: require_scope(caller.principal, Scope.KEYS_READ))
        info = self.signer.get_key(ref)
        if not caller.principal.may_use(info.labels):
            self._refuse(base | key_fields(info), self._labels_refusal(caller, info))
        return info

    def list_keys(
        self,
        caller: Caller,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage:
        """``keys:read``; a client restricted to some labels sees only keys with one of them
        (so a page may hold fewer than ``limit`` keys while ``next_cursor`` goes on)."""
        base = self._entry(caller, Scope.KEYS_READ, self._in_force_of(caller))
        self._guard(base, lambda: require_scope(caller.principal, Scope.KEYS_READ))
        page = self.signer.list_keys(
            custody=custody, chain=chain, label=label, cursor=cursor, limit=limit
        )
        return visible_page(caller.principal, page)

    # signatures

    def signs_inline(self, calls: Sequence[SigningCall]) -> bool:
        """True when :meth:`sign` of ``calls`` needs no I/O but its audit append (which a
        caller inside :func:`~signd.audit.log.deferring_appends` does not wait for): every
        key is known and signs in this process. Authentication never needs I/O here."""
        return all(map(self.signer.key_is_local, {call.key for call in calls}))

    def performed(self, caller: Caller, call: SigningCall) -> Signed | Exception | None:
        """``None``: this gate performs no call while authenticating (it signs in this
        process, in one gate call for the requests of a pass of the loop)."""
        return None

    async def sign_async(
        self, caller: Caller, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        """:meth:`sign` for an event loop: on the loop when :meth:`signs_inline`, else in
        ``run``'s threads, :data:`THREAD_CHUNK` calls each (a device that signs slowly, such
        as an HSM, then signs several chunks at once)."""
        if self.signs_inline(calls):
            return self.sign(caller, calls)
        chunks = [
            calls[start : start + THREAD_CHUNK] for start in range(0, len(calls), THREAD_CHUNK)
        ]
        parts: list[list[Signed | Exception] | BaseException] = await asyncio.gather(
            *(run(self.sign, caller, chunk) for chunk in chunks), return_exceptions=True
        )
        outcomes: list[Signed | Exception] = []
        for chunk, part in zip(chunks, parts, strict=True):
            if isinstance(part, Exception):  # that chunk's results are lost, not the others'
                outcomes.extend(part for _ in chunk)
            elif isinstance(part, BaseException):
                raise part
            else:
                outcomes.extend(part)
        return outcomes

    async def sign_each_async(
        self, requests: Sequence[tuple[Caller, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        """:meth:`sign_async` of each request: those that :meth:`signs_inline` in one gate
        call on the loop (:meth:`sign_each`), the others each on its own, concurrently. A
        request whose gate call failed as a whole gets that error in its place."""
        inline = [self.signs_inline(calls) for _, calls in requests]
        gathered = [request for request, alone in zip(requests, inline, strict=True) if alone]
        signed = iter(self.sign_each(gathered) if gathered else ())
        others = [request for request, alone in zip(requests, inline, strict=True) if not alone]
        rest = iter(await each_alone(self.sign_async, others, run) if others else ())
        return [next(signed) if alone else next(rest) for alone in inline]

    def sign(self, caller: Caller, calls: Sequence[SigningCall]) -> list[Signed | Exception]:
        """Sign ``calls`` in order: each one's :class:`Signed` or the error that refused it.

        The audit records of all of them are appended with one durable write before any
        result is returned; if that write fails, every result is withheld (the error takes
        its place).
        """
        [outcomes] = self.sign_each([(caller, calls)])
        return outcomes

    def sign_each(
        self, requests: Sequence[tuple[Caller, Sequence[SigningCall]]]
    ) -> list[list[Signed | Exception]]:
        """:meth:`sign` of each request (its caller and calls), in one gate call: decided in
        order, each request with decisions and audit records of its own, every record
        appended with one durable write, and the signatures of all of them made together
        when there are many (:mod:`signd.gate.together`)."""
        entries = DecisionLog()
        keys: dict[str, KeyInfo | SigndError] = {}
        together: SignTogether[KeyInfo] | None = None
        if sum(len(calls) for _, calls in requests) >= PARALLEL_MIN:
            together = SignTogether(entries)
        # The same for every request of the call decided under one policy (by client).
        decided_under: dict[str, Decided] = {}
        answers: list[list[Signed | Exception | Waiting[KeyInfo]]] = []
        for caller, calls in requests:
            in_force = self._in_force_of(caller)
            decided = decided_under.setdefault(in_force.policy.sha256, {})
            entries.next_request()
            if together is not None:
                together.next_request()
            outcomes: list[Signed | Exception | Waiting[KeyInfo]] = []
            for call in calls:
                try:
                    run = together.run_of(call) if together is not None else None
                    if run is not None:
                        assert together is not None
                        outcomes.append(together.again(run, call))
                    else:
                        outcomes.append(
                            self._sign_one(caller, call, keys, decided, entries, in_force, together)
                        )
                except Exception as exc:
                    outcomes.append(exc)
            answers.append(outcomes)
        if together is not None:
            together.finish(self.engine, self.signer.sign_hashes)
        try:
            self.audit.write(entries.entries)
        except Exception as exc:
            return [[exc for _ in outcomes] for outcomes in answers]
        return [[_made(outcome) for outcome in outcomes] for outcomes in answers]

    def _sign_one(
        self,
        caller: Caller,
        call: SigningCall,
        keys: dict[str, KeyInfo | SigndError],
        decided: Decided,
        entries: DecisionLog,
        in_force: InForce,
        together: SignTogether[KeyInfo] | None = None,
    ) -> Signed | Waiting[KeyInfo]:
        """One call through the gate: its :class:`Signed`, or (with ``together``, a call the
        policy decides on the key alone, with a key in memory) its signature left to make
        with the others (:mod:`signd.gate.together`)."""
        principal = caller.principal
        base = self._entry(caller, OPERATION_OF[call.kind], in_force)

        def refuse(error: SigndError, rule: str | None = None) -> SigndError:
            entries.append(base | {"decision": "refused", "reason": error.message, "rule": rule})
            return error

        lacking = switch_refusal(call.kind, self.limits) or scope_refusal(principal, call.kind)
        if lacking is not None:
            raise refuse(lacking)
        info = keys.get(call.key)
        if info is None:
            try:
                info = keys[call.key] = self.signer.get_key(call.key)
            except SigndError as exc:
                keys[call.key] = exc
                raise refuse(exc) from None
        if isinstance(info, SigndError):
            raise refuse(info)
        base |= key_fields(info)
        try:
            approval = approve(principal, call, info, self.engine, decided, policy=in_force.policy)
        except SigndError as exc:
            raise refuse(exc, rule_of(exc)) from None
        decision, prepared = approval.decision, approval.prepared
        if together is not None and not prepared.facts and self.signer.key_is_local(call.key):
            key = info
            run = Run(info, base, decision, approval.intent, lambda: key)
            return together.start(call, run, info, prepared.digest, prepared.assemble)
        try:
            signature = self.signer.sign_hash(info, prepared.digest)
            result = prepared.assemble(signature)
        except SigndError as exc:  # the custody's own error, a refused credential included
            raise refuse(exc, decision.rule) from None
        except Exception as exc:  # a fault of the custody's library: refused, on the record
            raise refuse(signing_fault(exc), decision.rule) from None
        try:
            spend = self.engine.commit(decision, approval.intent)
        except AccessDenied as exc:  # the spend window filled up meanwhile, or a reload
            raise refuse(PolicyDenied(exc.message, rule=decision.rule), decision.rule) from None
        except SigndError as exc:
            raise refuse(exc, decision.rule) from None
        entries.signed(
            base,
            reason=decision.reason,
            rule=decision.rule,
            result_sha256=sha256_hex(result_bytes(result)),
            spend=spend,
        )
        return Signed(info, result)

    # helpers

    def in_force(self) -> InForce:
        """The policy and clients in force now, read as one pair (a reload swaps them while
        no one reads), for a request to be authenticated and decided under."""
        with self._pair_lock:
            return InForce(self.engine.policy, self.verifier.registry)

    def _in_force_of(self, caller: Caller) -> InForce:
        """The configuration ``caller`` was authenticated under (else the one in force)."""
        return caller.session if isinstance(caller.session, InForce) else self.in_force()

    @staticmethod
    def _entry(
        caller: Caller, operation: str, in_force: InForce, *, chain: str | None = None
    ) -> AuditEntry:
        return caller_entry(
            caller.client_id, caller.request_sha256, operation, in_force, chain=chain
        )

    @staticmethod
    def _labels_refusal(caller: Caller, info: KeyInfo) -> OutOfScope:
        return labels_refusal(caller.client_id, info)

    def _refuse(self, entry: AuditEntry, error: SigndError, rule: str | None = None) -> NoReturn:
        self.audit.write([entry | {"decision": "refused", "reason": error.message, "rule": rule}])
        raise error

    def _guard(self, entry: AuditEntry, action: Callable[[], T], rule: str | None = None) -> T:
        """Run ``action``; a refusal or failure is audited (as refused) and raised."""
        try:
            return action()
        except SigndError as exc:
            self._refuse(entry, exc, rule)


W = TypeVar("W")
"""Who asks: a :class:`Caller` at a gatekeeper, the service's principal at its gate."""

SignAsync = Callable[[W, Sequence[SigningCall], Runner], Awaitable[list[Signed | Exception]]]


async def each_alone(
    sign_async: SignAsync[W], requests: Sequence[tuple[W, Sequence[SigningCall]]], run: Runner
) -> list[list[Signed | Exception] | Exception]:
    """``sign_async`` of each request, concurrently, each in a gate call of its own: its
    outcomes, or the error its call met as a whole (a cancellation is raised: it is no
    request's error)."""
    answers: list[list[Signed | Exception] | BaseException] = await asyncio.gather(
        *(sign_async(who, calls, run) for who, calls in requests), return_exceptions=True
    )
    each: list[list[Signed | Exception] | Exception] = []
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, Exception):
            raise answer
        each.append(answer)
    return each


def warn_unrecorded(custody: str, key_ids: Sequence[str], error: BaseException) -> None:
    """Name keys that were made but whose ``keys:create`` records could not be written.
    The caller was refused and given none of their addresses, so nothing can have been
    sent to them; an operator may look them up (or remove them) by these ids."""
    why = error.message if isinstance(error, SigndError) else type(error).__name__
    log.warning(
        "%d %s key(s) were made but have no audit record (the request was refused, their "
        "addresses were given to no one): %s; the record failed: %s",
        len(key_ids),
        custody,
        ", ".join(key_ids),
        why,
    )


def key_fields(info: KeyInfo) -> AuditEntry:
    return {"key_id": info.key_id, "chain": info.chain}


# The steps every gate shares, in this process or in the enclave.


def identify(
    request: GateRequest,
    verify_signed: Callable[[], Principal],
    verify_bearer: Callable[[str], Principal],
) -> Principal:
    """Who sent ``request``: its bearer token or its request signature (not both), or
    :class:`~signd.errors.AccessDenied`."""
    authorization = request.header("authorization")
    if authorization is not None:
        if any(name.lower().startswith(SIGNED_HEADER_PREFIX) for name in request.headers):
            raise AccessDenied("give a request signature or a bearer token, not both")
        if authorization[: len(BEARER)].lower() != BEARER:
            raise AccessDenied("the Authorization header must be 'Bearer <token>'")
        return verify_bearer(authorization[len(BEARER) :].strip())
    if request.header(HEADER_SIGNATURE) is None and request.header(HEADER_CLIENT) is None:
        raise AccessDenied("no credentials: sign the request (X-Signd-*) or send a token")
    return verify_signed()


def authentication_refusal(request: GateRequest, why: str, in_force: InForce) -> AuditEntry:
    """The audit entry of a request refused before its caller was known."""
    return {
        "operation": AUTHENTICATE,
        "decision": "refused",
        "reason": f"{request.method} {request.path[:MAX_SHOWN_PATH]}: {why}",
        "request_sha256": request.sha256,
        "policy_sha256": in_force.policy.sha256,
        "clients_sha256": in_force.clients_sha256,
    }


def caller_entry(
    client_id: str,
    request_sha256: str,
    operation: str,
    in_force: InForce,
    *,
    chain: str | None = None,
) -> AuditEntry:
    """The fields every audit entry of a caller's request starts from, the configuration
    its gate call decides under (``in_force``) among them."""
    return {
        "operation": str(operation),
        "client_id": client_id,
        "chain": chain,
        "request_sha256": request_sha256,
        "policy_sha256": in_force.policy.sha256,
        "clients_sha256": in_force.clients_sha256,
    }


def switch_refusal(kind: SigningKind, limits: Limits) -> BlindSigningDisabled | None:
    """The refusal of a raw hash while ``allow_blind_signing`` is off, else ``None``."""
    if kind is SigningKind.HASH and not limits.allow_blind_signing:
        return BlindSigningDisabled()
    return None


def scope_refusal(principal: Principal, kind: SigningKind) -> OutOfScope | None:
    """The refusal of a client that lacks the scope ``kind`` needs, else ``None``."""
    scope = SCOPE_OF[kind]
    if principal.has_scope(scope):
        return None
    return OutOfScope(f"client {principal.client_id!r} lacks scope {scope}")


def require_scope(principal: Principal, scope: Scope) -> None:
    """Raise :class:`OutOfScope` unless the client holds ``scope``."""
    if not principal.has_scope(scope):
        raise OutOfScope(f"client {principal.client_id!r} lacks scope {scope}")


def visible_page(principal: Principal, page: KeyPage) -> KeyPage:
    """The keys of ``page`` the client may use; the cursor goes on regardless (so a page may
    hold fewer keys than asked for)."""
    return KeyPage([key for key in page.keys if principal.may_use(key.labels)], page.next_cursor)


def labels_refusal(client_id: str, info: KeyInfo) -> OutOfScope:
    """The refusal of a key with none of the client's labels. It names neither the key's id
    nor its labels, which are other clients' business (the audit record names the key)."""
    return OutOfScope(f"client {client_id!r} may not use this key: it has none of its labels")


@dataclass(frozen=True, slots=True)
class Approval:
    """A call the policy allowed: what to sign (``prepared.digest``), and the decision to
    :meth:`~signd.policy.PolicyEngine.commit` once it is signed."""

    key: KeyInfo
    prepared: Prepared
    intent: SigningIntent
    decision: Decision


def _made(outcome: Signed | Exception | Waiting[KeyInfo]) -> Signed | Exception:
    """A call's outcome once its signature, if it waited, is made."""
    if not isinstance(outcome, Waiting):
        return outcome
    if outcome.error is not None:
        return outcome.error
    assert outcome.result is not None
    return Signed(outcome.run.key, outcome.result)


Decided = dict[tuple[str, str, str, tuple[str, ...], Operation], tuple[SigningIntent, Decision]]
"""The allowed decisions of one gate call whose intent is the client and key alone, by the
client, the key's id, chain and labels (everything of the key an intent holds) and the
operation (see :func:`approve`)."""


def approve(
    principal: Principal,
    call: SigningCall,
    info: KeyInfo,
    engine: PolicyEngine,
    decided: Decided | None = None,
    *,
    policy: Policy | None = None,
) -> Approval:
    """Key labels → decode the payload → intent → policy. A refusal raises: OutOfScope,
    the decoding error, or :class:`PolicyDenied` naming its rule (see :func:`rule_of`).
    The scope is checked before, with :func:`scope_refusal`, so that a client without it
    learns nothing about keys.

    With ``decided`` (one per gate call), a payload that gives the policy no facts (a hash,
    a message) reuses the decision of an earlier call by the same client of the same
    operation with the same key (in a gathered gate call, perhaps another request's): its
    intent is the same. The spend is still committed per signature.

    ``policy`` is the one to decide under (the gate call's :class:`~signd.gate.audit.InForce`),
    else the one in force now."""
    if not principal.may_use(info.labels):
        raise labels_refusal(principal.client_id, info)
    prepared = prepare(call.kind, call.payload, info)
    same_intent = (principal.client_id, info.key_id, info.chain, info.labels, prepared.operation)
    if decided is not None and not prepared.facts:
        known = decided.get(same_intent)
        if known is not None:
            return Approval(info, prepared, *known)
    intent = SigningIntent(
        principal.client_id,
        info.key_id,
        info.labels,
        info.chain,
        prepared.operation,
        **prepared.facts,
    )
    decision = engine.check(intent, policy=policy)
    if decision.refused:
        raise PolicyDenied(decision.reason, rule=decision.rule)
    if decided is not None and not prepared.facts:
        decided[same_intent] = (intent, decision)
    return Approval(info, prepared, intent, decision)
