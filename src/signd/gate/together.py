"""Signatures a gate call makes together, on every core.

A large gate call (:data:`~signd.crypto.secp256k1.PARALLEL_MIN` calls or more) decides on
its calls one after another, in order, as always; but a call the policy decides on the key
alone (a hash or a message: no facts, no value) with a key that signs in memory does not
sign at once. Its audit entry's place is taken (:meth:`~signd.gate.audit.DecisionLog.
signed_later`) and its digest waits; once every call is decided, the waiting digests are
signed in one go, which :func:`~signd.crypto.secp256k1.sign_digests_with` shares out
between the cores, and the entries settled.

The calls after the first of a kind with a key form its :class:`Run`: the same client,
scope, key and labels, so the same decision, which :func:`~signd.gate.keeper.approve`
would reuse anyway; only their payload is read again. Each run's decision is committed
once, before its signatures: nothing is counted for these calls, and a policy reloaded
since the decision refuses every one of them, each with a record of its own.

The gate on the host and the enclave's gate both use it; ``K`` is what signs: a
:class:`~signd.custody.base.KeyInfo` on the host, a proven key in the enclave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from signd.crypto.secp256k1 import RecoverableSignature, check_digest
from signd.custody.base import KeyInfo
from signd.errors import AccessDenied, SigndError
from signd.gate.audit import AuditEntry, DecisionLog
from signd.gate.errors import PolicyDenied, rule_of, signing_fault
from signd.gate.intents import hash_result, prepare, result_bytes, sha256_hex
from signd.gate.operations import SigningCall, SigningKind, SigningResult
from signd.policy import Decision, PolicyEngine, SigningIntent

K = TypeVar("K")

Assemble = Callable[[RecoverableSignature], SigningResult]


@dataclass(frozen=True, slots=True, eq=False)
class Run(Generic[K]):
    """What the first allowed call of a kind with a key settled for the calls of that kind
    with that key after it: the key, its audit entry's fields, the decision, and how to get
    what signs with the key for each call."""

    key: KeyInfo
    base: AuditEntry
    decision: Decision
    intent: SigningIntent
    signer_for: Callable[[], K]


@dataclass(slots=True)
class Waiting(Generic[K]):
    """A decided call whose signature is still to be made; :meth:`SignTogether.finish`
    sets its ``signature`` and ``result``, or its ``error``."""

    run: Run[K]
    signer: K
    digest: bytes
    assemble: Assemble
    token: str
    signature: RecoverableSignature | None = None
    result: SigningResult | None = None
    error: SigndError | None = None


SignMany = Callable[[Sequence[tuple[K, bytes]]], Sequence[RecoverableSignature | SigndError]]
"""Signs (signer, digest) pairs, in order; one that fails gives its error in its place."""


class SignTogether(Generic[K]):
    """The calls of one gate call whose signatures are made together (see the module)."""

    __slots__ = ("_entries", "_runs", "_started", "_waiting")

    def __init__(self, entries: DecisionLog) -> None:
        self._entries = entries
        self._runs: dict[tuple[str, SigningKind], Run[K]] = {}
        """The current request's runs, by the key reference and kind of their calls."""
        self._started: list[Run[K]] = []
        """Every run, in the order they started."""
        self._waiting: list[Waiting[K]] = []

    def next_request(self) -> None:
        """The calls from here on are another request's: they start runs of their own (a
        run's decision and audit entry belong to one request), and still sign with the rest."""
        self._runs.clear()

    def run_of(self, call: SigningCall) -> Run[K] | None:
        """The run ``call`` joins: an earlier call of its kind with the same key reference."""
        return self._runs.get((call.key, call.kind))

    def start(
        self, call: SigningCall, run: Run[K], signer: K, digest: bytes, assemble: Assemble
    ) -> Waiting[K]:
        """Wait with the first call of ``run``, whose decision the caller has just made."""
        self._runs[call.key, call.kind] = run
        self._started.append(run)
        return self._wait(run, signer, digest, assemble)

    def again(self, run: Run[K], call: SigningCall) -> Waiting[K]:
        """Wait with a later call of ``run``: its payload read, what signs got. A refusal is
        recorded in its place and raised."""
        assemble: Assemble
        try:
            if call.kind is SigningKind.HASH:
                digest, assemble = check_digest(call.payload), hash_result
            else:
                prepared = prepare(call.kind, call.payload, run.key)
                digest, assemble = prepared.digest, prepared.assemble
            signer = run.signer_for()
        except SigndError as exc:
            self._entries.append(
                run.base | {"decision": "refused", "reason": exc.message, "rule": rule_of(exc)}
            )
            raise
        return self._wait(run, signer, digest, assemble)

    def finish(self, engine: PolicyEngine, sign_many: SignMany[K]) -> None:
        """Commit each run's decision, make every waiting signature at once with
        ``sign_many``, and settle their audit entries: every token is replaced, by a result
        or by a refusal, whatever fails."""
        if not self._waiting:
            return
        refused: dict[int, SigndError] = {}
        for run in self._started:
            try:
                engine.commit(run.decision, run.intent)
            except AccessDenied as exc:  # a reload since the decision
                refused[id(run)] = PolicyDenied(exc.message, rule=run.decision.rule)
        settled: dict[str, str | SigndError] = {}
        signing = self._waiting
        if refused:
            signing = []
            for waiting in self._waiting:
                error = refused.get(id(waiting.run))
                if error is None:
                    signing.append(waiting)
                else:
                    waiting.error = settled[waiting.token] = error
        signatures: Sequence[RecoverableSignature | SigndError]
        try:
            signatures = sign_many([(waiting.signer, waiting.digest) for waiting in signing])
        except Exception as exc:  # a fault of the signing library: each call is refused
            failure = signing_fault(exc)
            signatures = [failure for _ in signing]
        for waiting, signature in zip(signing, signatures, strict=True):
            try:
                if isinstance(signature, SigndError):
                    raise signature
                waiting.result = result = waiting.assemble(signature)
                waiting.signature = signature
                settled[waiting.token] = sha256_hex(result_bytes(result))
            except SigndError as exc:
                waiting.error = settled[waiting.token] = exc
        self._entries.settle(settled)

    def _wait(self, run: Run[K], signer: K, digest: bytes, assemble: Assemble) -> Waiting[K]:
        decision = run.decision
        token = self._entries.signed_later(run.base, reason=decision.reason, rule=decision.rule)
        waiting = Waiting(run, signer, digest, assemble, token)
        self._waiting.append(waiting)
        return waiting
