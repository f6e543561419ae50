"""The gate inside the enclave: authentication, policy and audit sealing, where the host
cannot reach them.

The host hands over each request exactly as it received it (method, target, body, auth
headers) with the descriptions of the keys it names. The enclave

1. authenticates it: the request signature (time window, nonce) or the bearer token. A signed
   request may be shown again, for the same body, but each of its calls is performed once
   (:meth:`~signd.auth.RequestVerifier.present`), so a host cannot replay a call;
2. derives what to do from the authenticated bytes (:func:`~signd.gate.interpret.interpret`),
   never from the host's parsed calls; a host may only add the transaction fields the caller
   left out and its downstream node filled (:func:`~signd.gate.interpret.apply_fills`);
3. checks scope, key labels and the policy (:func:`~signd.gate.keeper.approve`). A sealed key's
   labels are proven by unsealing it (:meth:`~signd.enclave.signer.EnclaveSigner.proven_key`),
   not taken from the host's records;
4. signs sealed keys itself, and keys of its own HSM (the host names the token object, and the
   signature must verify under the public key it described, or it is not released); for
   custody the host holds (keystore, KMS keys, a host-side HSM) it answers ``approved`` with
   the digest for the host to sign: the host holds those keys anyway, so for them the gate
   authorises and audits but cannot enforce;
5. commits the spend and seals an audit record for every decision, refusals and failed
   authentications included, all returned with the answer for the host to append before it
   releases any result. An allowed signing's record carries the spend it committed.

Spend windows are rebuilt at the first GATE_CONFIGURE from ``audit_tail``: the log's last
records (oldest first, ending with ``audit_head``), which must verify, link and reach back
over the policy's longest window (:mod:`signd.audit.tail`). A tail too long for one message
comes in several: each later GATE_CONFIGURE carries the next older chunk, and the part of
it up to where the previous one began is checked and replayed (a chunk without that record
is left aside). Until the window is covered, requests under rules with windows are
refused (:class:`~signd.policy.SpendWindowsUnavailable`) rather than checked against
windows that may be short.

Messages (:class:`~signd.enclave.protocol.MessageType`): GATE_CONFIGURE (the clients file,
the policy file and the audit MAC key, which is a KMS data key generated and unwrapped here
and kept by the host only as ciphertext), GATE, and AUDIT_VERIFY (the host has no MAC key,
so the log is verified here, streamed in chunks with a MAC'ed state carried between them).
AUDIT_VERIFY carries the audit key's ciphertext and unwraps it for verification only: it
changes nothing the gate enforces (only a GATE_CONFIGURE, on a reload, does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import cbor2

from signd.audit.records import (
    GENESIS,
    AuditSigner,
    ChainHead,
    SealedAuditRecord,
    seal_is_valid,
)
from signd.audit.tail import check_tail, reaches, spends
from signd.audit.verify import PolicyRuns
from signd.auth import ClientsHolder, Principal, RequestVerifier, Scope
from signd.auth.request_signing import MAX_NONCE_CAPACITY, Presentation, default_nonce_quota
from signd.chains import address_deriver
from signd.crypto.secp256k1 import PARALLEL_MIN, normalize_signature
from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo, check_labels
from signd.enclave.protocol import (
    CUSTODY_ENCLAVE,
    CUSTODY_HSM,
    MAX_ANSWER_FRAME_SIZE,
    MAX_NAME_LENGTH,
    CreatedKey,
    HsmKeyReference,
    KeyReference,
    canonical_labels,
    require_bytes,
    require_list,
    require_str,
)
from signd.enclave.signer import EnclaveSigner, ProvenKey, Unsealing
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    ConfigurationRefused,
    IntegrityError,
    InvalidField,
    InvalidRequest,
    KeyNotFound,
    SigndError,
    shown,
)
from signd.gate.audit import MAX_REASON, AuditEntry, DecisionLog, InForce, RefusalRecords
from signd.gate.errors import OutOfScope, PolicyDenied, Unauthenticated, rule_of, signing_fault
from signd.gate.intents import result_bytes, sha256_hex
from signd.gate.interpret import (
    DEFAULT_LIMITS,
    Action,
    CreateKeys,
    Limits,
    ReadKeys,
    SignCalls,
    apply_fills,
    interpret,
)
from signd.gate.keeper import (
    Approval,
    Decided,
    GateRequest,
    approve,
    authentication_refusal,
    caller_entry,
    identify,
    key_fields,
    scope_refusal,
    switch_refusal,
)
from signd.gate.operations import SigningCall, SigningKind
from signd.gate.together import Run, SignTogether, Waiting
from signd.kms.base import DATA_KEY_SIZE, KmsClient
from signd.policy import Operation, PolicyEngine, PolicyHolder, SigningIntent

if TYPE_CHECKING:
    from signd.enclave.hsm import EnclaveHsm

log = logging.getLogger(__name__)

AUDIT_KEY_CONTEXT: Final[Mapping[str, str]] = {"service": "signd", "purpose": "audit-mac-key"}
"""The KMS encryption context of the audit MAC key."""
UNCONFIGURED: Final = "the enclave's gate is not configured (send GATE_CONFIGURE)"
MAX_CONFIG_SIZE: Final = 256 * 1024
MAX_HEADERS: Final = 32
MAX_HEADER_SIZE: Final = 4096
MAX_TARGET: Final = 8192
"""The longest request target (path and query) a GATE carries."""
KEYS_TARGET: Final = "/v1/keys"
"""Requests under this path may make keys (KMS data keys, blob writes)."""
MAX_KEYS: Final = 1000
MAX_SELECT: Final = 1000
MAX_VERIFY_CHUNK: Final = 4096
MAX_TAIL_RECORDS: Final = 4096
"""The most audit log lines one GATE_CONFIGURE carries in ``audit_tail``."""
MAX_LINE_SIZE: Final = 64 * 1024
"""The longest audit log line the enclave reads: a longer one is no record this gate sealed
(the largest, with :data:`~signd.gate.audit.MAX_GROUPED_RESULTS` results, is far shorter)."""
SIGNATURE_SIZE: Final = 65
_VERIFY_STATE_LABEL: Final = b"signd audit-verify state v1"
VERIFY_KEYS_KEPT: Final = 4
"""How many audit keys unwrapped for AUDIT_VERIFY only the gate keeps, by their ciphertext."""
VERIFY_KEY_AGE: Final = 600.0
"""Seconds an audit key unwrapped for AUDIT_VERIFY only is kept before KMS is asked again."""


ANSWER_SPARE: Final = 64 * 1024
"""Room an answer keeps for what is not a made key (outcomes, principal, framing)."""
SEALING_BYTES: Final = 512
"""What sealing adds to an audit entry's JSON (``seq``, ``time``, ``prev_hash``, ``hash`` and
``mac``, with their names), rounded up."""
MADE_KEY_BYTES: Final = 256
"""A made key's CBOR body without its labels (key id, chain, address, blob, public key)."""


def most_keys_answered(allowed: AuditEntry, labels: Sequence[str]) -> int:
    """How many keys with ``labels`` one GATE answer can carry, each with its sealed
    ``allowed`` record, within :data:`MAX_ANSWER_FRAME_SIZE`: a bound, so that a creation
    whose answer would not fit is refused before any key is made (as ASCII JSON, an entry's
    text is at least as long as any form of it)."""
    record = {**allowed, "key_id": "0" * 32, "result_sha256": "0" * 64}
    record["reason"] = str(record["reason"])[:MAX_REASON]
    entry_bytes = len(json.dumps(record, ensure_ascii=True, default=str)) + SEALING_BYTES
    label_bytes = sum(len(label.encode()) + 8 for label in labels)
    return (MAX_ANSWER_FRAME_SIZE - ANSWER_SPARE) // (entry_bytes + MADE_KEY_BYTES + label_bytes)


def _bytes(body: Mapping[str, Any], name: str, *, limit: int) -> bytes:
    value = body.get(name, b"")
    if not isinstance(value, bytes) or len(value) > limit:
        raise InvalidField(f"{name} must be at most {limit} bytes", field=name)
    return value


@dataclass(frozen=True, slots=True)
class _Configured:
    """What a GATE_CONFIGURE put in force, replaced whole by the next one: a GATE takes it
    once, and authenticates and decides with its ``in_force`` pair throughout (never one
    configuration's clients beside another's policy). The holders, verifier (its nonces)
    and engine (its spend windows) carry over from one configuration to the next."""

    in_force: InForce
    clients: ClientsHolder
    policy: PolicyHolder
    verifier: RequestVerifier
    engine: PolicyEngine
    limits: Limits
    decided: Decided = field(default_factory=dict)
    """Allowed decisions whose intent is the client and the key alone (a hash, a message),
    made under ``in_force.policy``: such a decision depends on nothing else (no value, so no
    spend window), so every GATE of this configuration shares it (see
    :func:`~signd.gate.keeper.approve`). At most :data:`DECIDED_KEPT`."""


DECIDED_KEPT: Final = 10_000
"""How many decisions a configuration keeps (:attr:`_Configured.decided`); past that they
are dropped, and made again as needed."""


@dataclass(frozen=True, slots=True)
class _Presented:
    """An authenticated request: its caller, the digest of its body, and the configuration
    its GATE decides under."""

    principal: Principal
    request_sha256: str
    in_force: InForce


@dataclass(slots=True)
class _Answer:
    """A GATE answer being built, and the audit entries it will carry."""

    entries: DecisionLog = field(default_factory=DecisionLog)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)


class _Described(NamedTuple):
    """A key as the host described it, and for a sealed key the reference its blob must
    prove: made once per GATE, for every call that names the key."""

    info: KeyInfo
    sealed: KeyReference | None


_DESCRIBED_AT: Final = datetime.fromtimestamp(0, UTC)
"""The ``created_at`` of a key the host describes: not part of its description, and read by
nothing here."""

READINGS_KEPT: Final = 8
"""How many requests' readings the gate keeps (:class:`_Readings`)."""


class _Readings:
    """The readings of the last :data:`READINGS_KEPT` requests. Reading is a pure function of
    a request's method, target, body and the limits, so a request shown to the gate once per
    call (a JSON-RPC batch: once to authenticate, then once for each member that signs) is
    read once, not once per call. Only readings that succeed are kept: an error is raised
    anew each time, and would gather tracebacks if it were kept."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, str, str, Limits], Action] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, request: GateRequest, limits: Limits) -> Action:
        """:func:`~signd.gate.interpret.interpret` of ``request`` under ``limits``."""
        kept_as = (request.method, request.path, request.sha256, limits)
        with self._lock:
            action = self._kept.get(kept_as)
            if action is not None:
                self._kept.move_to_end(kept_as)
                return action
        action = interpret(request.method, request.path, request.body, limits=limits)
        with self._lock:
            self._kept[kept_as] = action
            while len(self._kept) > READINGS_KEPT:
                self._kept.popitem(last=False)
        return action


class EnclaveGate:
    """The GATE, GATE_CONFIGURE and AUDIT_VERIFY handlers of an enclave; thread-safe.

    ``now`` is the clock (request windows, spend windows, audit times), injectable for tests.
    """

    def __init__(
        self,
        signer: EnclaveSigner,
        kms: KmsClient,
        *,
        node: str = "enclave",
        now: Callable[[], float] = time.time,
        hsm: EnclaveHsm | None = None,
    ) -> None:
        self._signer = signer
        self._kms = kms
        self._hsm = hsm
        self._node = node
        self._now = now
        self._configured: _Configured | None = None
        self._audit: AuditSigner | None = None
        self._audit_key: Secret | None = None
        self._audit_key_ciphertext = b""
        self._lock = threading.Lock()
        self._seal_lock = threading.Lock()
        self._readings = _Readings()
        self._refusals = RefusalRecords(
            DEFAULT_LIMITS.auth_failure_audit_rate,
            DEFAULT_LIMITS.auth_failure_audit_burst,
            clock=now,
        )
        self._started = math.floor(now())
        """The whole second this gate came up: requests signed before it are refused."""
        self._tail_wanted: tuple[bytes, float] | None = None
        """While the spend windows are incomplete: the hash the next older chunk of the
        audit tail must end at, and the time it must reach back to."""
        self._verify_keys: OrderedDict[bytes, tuple[Secret, float]] = OrderedDict()
        """Audit keys unwrapped for AUDIT_VERIFY only, by ciphertext, with when."""
        self._verify_keys_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EnclaveGate(configured={self._configured is not None}, audit={self._audit!r})"

    # configuration

    def attestation_user_data(self) -> bytes | None:
        """``sha256(policy) || sha256(clients)`` of the files in force (``None`` before the
        first GATE_CONFIGURE): what an attestation document binds."""
        configured = self._configured
        if configured is None:
            return None
        in_force = configured.in_force
        return bytes.fromhex(in_force.policy.sha256) + bytes.fromhex(in_force.clients_sha256)

    def configure(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """GATE_CONFIGURE: put the clients and policy files in force, and the audit key.

        Both files are parsed before either replaces the one in force, so a bad file changes
        nothing. On the first call the audit MAC key is unwrapped (or, given none, generated:
        its ciphertext comes back for the host to keep) and the chain continues from
        ``audit_head`` once its MAC verifies. Later calls keep the enclave's own chain head
        unless ``resume`` asks to continue from the host's (after records were lost on the
        way to the log): a record saying so is sealed first, so the loss shows in the log.
        """
        clients_data = _bytes(body, "clients", limit=MAX_CONFIG_SIZE)
        policy_data = _bytes(body, "policy", limit=MAX_CONFIG_SIZE)
        key_ciphertext = _bytes(body, "audit_key", limit=MAX_CONFIG_SIZE)
        head_data = _bytes(body, "audit_head", limit=MAX_CONFIG_SIZE)
        resume = body.get("resume", False) is True
        nonces = _limit(body, "nonce_capacity", DEFAULT_LIMITS.nonce_capacity, MAX_NONCE_CAPACITY)
        limits = Limits(
            max_batch=_limit(body, "max_batch", DEFAULT_LIMITS.max_batch),
            max_keys_per_request=_limit(
                body, "max_keys_per_request", DEFAULT_LIMITS.max_keys_per_request
            ),
            allow_blind_signing=body.get("allow_blind_signing", False) is True,
            auth_failure_audit_rate=_rate(
                body, "auth_failure_audit_rate", DEFAULT_LIMITS.auth_failure_audit_rate
            ),
            auth_failure_audit_burst=_limit(
                body, "auth_failure_audit_burst", DEFAULT_LIMITS.auth_failure_audit_burst
            ),
            nonce_capacity=nonces,
            nonce_quota=_limit(body, "nonce_quota", default_nonce_quota(nonces), nonces),
        )
        node = body.get("node", self._node)
        if not isinstance(node, str) or not 0 < len(node) <= MAX_NAME_LENGTH:
            raise InvalidField("node must be 1-256 characters of text", field="node")
        refused: list[str] = []
        problems: list[str] = []
        for holder, data in ((ClientsHolder, clients_data), (PolicyHolder, policy_data)):
            try:  # both are checked before either is replaced
                holder.parse(data)
            except ConfigurationError as exc:
                refused.append(holder.kind)
                problems.append(f"{holder.kind}: {exc.message}")
        if problems:
            log.error("configuration refused, the files in force stay: %s", "; ".join(problems))
            raise ConfigurationRefused("; ".join(problems), files=refused)
        last = SealedAuditRecord.from_json(head_data) if head_data else None
        tail = _audit_tail(body)
        answer: dict[str, Any] = {}
        with self._lock:
            mac_key = self._open_audit_key(key_ciphertext, answer)
            if last is not None and seal_is_valid(last, mac_key) != (True, True):
                raise IntegrityError("the audit log's last record does not verify")
            first_tail = _first_tail(mac_key, last, tail) if self._configured is None else []
            if self._audit is None:
                self._audit = AuditSigner(mac_key, node, last=last, now=self._now)
            elif resume:
                resumed = self._resume(mac_key, node, last)
                if resumed is not None:
                    answer["audit"] = [resumed.to_json()]
            configured = self._configured
            if configured is None:
                clients = ClientsHolder(clients_data)
                policy = PolicyHolder(policy_data)
                # Request timestamps are whole seconds: refuse those signed before the second
                # this enclave started (an earlier one may have seen their nonces). A request
                # signed after that and before this configuration reached no enclave.
                verifier = RequestVerifier(
                    clients,
                    now=self._now,
                    not_before=self._started,
                    nonce_capacity=limits.nonce_capacity,
                    nonce_quota=limits.nonce_quota,
                )
                engine = PolicyEngine(policy, now=self._now)
                since = self._now() - engine.longest_window
                self._replay(engine, first_tail, since)
                in_force = InForce(policy.current, clients.current)
            else:
                clients, policy = configured.clients, configured.policy
                verifier, engine = configured.verifier, configured.engine
                older: list[SealedAuditRecord] = []
                if self._tail_wanted is not None:
                    ends_at, since = self._tail_wanted
                    older = _ending_at(tail, ends_at)
                    if older:  # before the files are replaced: a tail that does not verify
                        check_tail(older, mac_key, ends_at=ends_at)  # changes nothing either
                in_force = InForce(policy.replace(policy_data), clients.replace(clients_data))
                if older:
                    self._replay(engine, older, since)
                verifier.limit_nonces(limits.nonce_capacity, limits.nonce_quota)
            self._configured = _Configured(in_force, clients, policy, verifier, engine, limits)
            self._refusals.configure(
                limits.auth_failure_audit_rate, limits.auth_failure_audit_burst
            )
            head = self._audit.head
            answer["windows_ready"] = engine.windows_ready
        log.info(
            "gate configured: clients sha256 %s, policy sha256 %s, audit seq %d",
            in_force.clients_sha256,
            in_force.policy.sha256,
            head.seq,
        )
        return answer | {
            "clients_sha256": in_force.clients_sha256,
            "policy_sha256": in_force.policy.sha256,
            "seq": head.seq,
        }

    def _replay(
        self, engine: PolicyEngine, tail: Sequence[SealedAuditRecord], since: float
    ) -> None:
        """Replay a checked chunk of the audit tail; the windows are whole once the tail
        reaches back to ``since`` (or the log's first record)."""
        complete = not tail or engine.longest_window == 0 or reaches(tail[0], since)
        if not complete:
            engine.await_replay(
                f"the host has sent the audit log back to record {tail[0].record.seq} only"
            )
        engine.replay(spends(tail), complete=complete)
        self._tail_wanted = None if complete else (tail[0].prev_hash, since)
        if not complete:
            log.warning(
                "spend windows incomplete: the audit tail reaches back to record %d only",
                tail[0].record.seq,
            )

    def _open_audit_key(self, ciphertext: bytes, answer: dict[str, Any]) -> Secret:
        """The audit MAC key: the one in force, or ``ciphertext`` unwrapped through KMS, or
        (none given on the first call) a new data key whose ciphertext goes in ``answer``."""
        if self._audit_key is not None:
            if ciphertext and not hmac.compare_digest(ciphertext, self._audit_key_ciphertext):
                raise ConfigurationError("this enclave keeps another audit key; not replacing it")
            return self._audit_key
        if ciphertext:
            plaintext = self._kms.decrypt(ciphertext, encryption_context=AUDIT_KEY_CONTEXT)
        else:
            data_key = self._kms.generate_data_key(encryption_context=AUDIT_KEY_CONTEXT)
            ciphertext = data_key.ciphertext
            # A data key is trusted only once KMS has unwrapped its ciphertext to it.
            plaintext = self._kms.decrypt(ciphertext, encryption_context=AUDIT_KEY_CONTEXT)
            if not hmac.compare_digest(plaintext.reveal_bytes(), data_key.plaintext.reveal_bytes()):
                raise IntegrityError("the KMS data key failed its round-trip check")
            answer["audit_key"] = ciphertext
            log.warning("created the audit MAC key; the host keeps it, sealed by KMS")
        if len(plaintext.reveal_bytes()) != DATA_KEY_SIZE:
            raise IntegrityError("the audit key is not a KMS data key")
        self._audit_key, self._audit_key_ciphertext = plaintext, ciphertext
        return plaintext

    def _resume(
        self, mac_key: Secret, node: str, last: SealedAuditRecord | None
    ) -> SealedAuditRecord | None:
        """Continue the chain from the host's ``last`` record, first sealing a record of
        what was lost: returned for the host to append (``None`` when nothing was lost)."""
        assert self._audit is not None
        ours = self._audit.head
        theirs = GENESIS if last is None else last.head
        if theirs == ours:
            return None
        if theirs.seq > ours.seq:
            raise IntegrityError("the host's audit head is ahead of the enclave's chain")
        with self._seal_lock:
            signer = AuditSigner(mac_key, node, last=last, now=self._now)
            resumed = signer.seal(
                operation="audit:resume",
                decision="refused",
                reason=(
                    f"the log resumed after record {theirs.seq}: records "
                    f"{theirs.seq + 1}-{ours.seq} sealed by the enclave were not stored"
                ),
            )
            self._audit = signer
        log.warning("audit chain resumed after record %d (enclave was at %d)", theirs.seq, ours.seq)
        return resumed

    def _in_force(self) -> tuple[_Configured, AuditSigner]:
        configured, audit = self._configured, self._audit
        if configured is None or audit is None:
            raise ConfigurationError(UNCONFIGURED)
        return configured, audit

    # the gate

    def answers_without_io(self, body: Mapping[str, Any]) -> bool:
        """Whether GATE ``body`` can be answered from memory: it only authenticates, or it
        signs with sealed keys already unsealed (one use each: the proof signs) or with
        custody the host holds. Key creation and HSM keys need I/O; so does anything this
        cannot tell at a glance (the server then answers it on its worker pool)."""
        request = body.get("request")
        target = request.get("target") if isinstance(request, dict) else None
        if not isinstance(target, str) or target.startswith(KEYS_TARGET):
            return False
        if not body.get("select"):
            return True
        keys = body.get("keys")
        if not isinstance(keys, list) or not keys:
            return False
        for item in keys:
            if not isinstance(item, dict) or item.get("custody") == CUSTODY_HSM:
                return False
            if item.get("custody") != CUSTODY_ENCLAVE:
                continue  # approved for the host's own custody: nothing to open here
            labels = item.get("labels", [])
            try:
                reference = KeyReference(
                    item["key_id"], item["chain"], item["address"], item["blob"], tuple(labels)
                )
            except (KeyError, TypeError, SigndError):
                return False
            if not self._signer.holds_unsealed(reference):
                return False
        return True

    def gate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """GATE: authenticate the request, then perform its calls named in ``select`` (none
        when absent: authentication only). See :class:`~signd.enclave.protocol.MessageType`."""
        configured, audit = self._in_force()
        request = _gate_request(body.get("request"))
        keys = _key_descriptors(body.get("keys", []))
        fills = _fills(body.get("fills", {}))
        select = _select(body.get("select"))
        answer = _Answer()
        in_force = configured.in_force
        try:
            action: Action | SigndError = self._readings.read(request, configured.limits)
        except SigndError as exc:
            action = exc
        try:
            presented = self._authenticate(configured, request, action, select, in_force)
        except AccessDenied as exc:
            refusal = authentication_refusal(request, exc.message, in_force)
            for entry in self._refusals.entries(refusal):
                answer.entries.append(entry)
            return self._seal(audit, answer, error=Unauthenticated(exc.message))
        result: dict[str, Any] = {"principal": _principal_body(presented.principal)}
        try:
            if isinstance(action, SigndError):
                if select:
                    raise action
            elif isinstance(action, ReadKeys):
                self._read_keys(presented, answer)
            elif select and isinstance(action, CreateKeys):
                self._create_keys(configured, presented, action, answer)
            elif select and isinstance(action, SignCalls):
                self._sign_calls(configured, presented, action, select, keys, fills, answer)
            elif select:
                raise InvalidRequest("the request has no calls to perform")
        except SigndError as exc:
            return self._seal(audit, answer, error=exc, result=result)
        return self._seal(audit, answer, result=result)

    def _authenticate(
        self,
        configured: _Configured,
        request: GateRequest,
        action: Action | SigndError,
        select: list[int],
        in_force: InForce,
    ) -> _Presented:
        verifier = configured.verifier
        presentation: Presentation | None = None

        def signed() -> Principal:
            nonlocal presentation
            calls: frozenset[str] = frozenset()  # named here: a bearer request performs none
            if isinstance(action, SignCalls):
                calls = frozenset(map(str, action.origins))
            elif isinstance(action, CreateKeys):
                calls = frozenset({"0"})
            presentation = verifier.present(
                request.method,
                request.path,
                request.body,
                request.headers,
                calls,
                follow_up=bool(select),
                registry=in_force.clients,
            )
            return presentation.principal

        principal = identify(
            request, signed, partial(verifier.verify_bearer, registry=in_force.clients)
        )
        if presentation is not None and select:  # (a bearer token: the host holds it anyway)
            verifier.perform(presentation, [str(origin) for origin in select])
        return _Presented(principal, request.sha256, in_force)

    def _read_keys(self, presented: _Presented, answer: _Answer) -> None:
        """A read needs ``keys:read``; which keys it shows is the host's to filter (the host
        keeps the key records, and reading them signs nothing)."""
        principal = presented.principal
        if not principal.has_scope(Scope.KEYS_READ):
            error = OutOfScope(f"client {principal.client_id!r} lacks scope {Scope.KEYS_READ}")
            answer.entries.append(
                self._entry(presented, Scope.KEYS_READ)
                | {"decision": "refused", "reason": error.message}
            )
            raise error

    def _create_keys(
        self,
        configured: _Configured,
        presented: _Presented,
        action: CreateKeys,
        answer: _Answer,
    ) -> None:
        principal = presented.principal
        base = self._entry(presented, Operation.KEYS_CREATE, chain=action.chain)

        def refuse(error: SigndError, rule: str | None = None) -> SigndError:
            answer.entries.append(
                base | {"decision": "refused", "reason": error.message, "rule": rule}
            )
            return error

        wanted = check_labels(action.labels)
        address_deriver(action.chain)  # an unknown chain is a bad request, not a refusal
        if not principal.has_scope(Scope.KEYS_CREATE):
            raise refuse(
                OutOfScope(f"client {principal.client_id!r} lacks scope {Scope.KEYS_CREATE}")
            )
        if not principal.may_label(wanted):
            raise refuse(
                OutOfScope(
                    f"client {principal.client_id!r} may not create keys labelled {list(wanted)}"
                )
            )
        intent = SigningIntent(principal.client_id, "", wanted, action.chain, Operation.KEYS_CREATE)
        decision = configured.engine.check(intent, policy=presented.in_force.policy)
        if decision.refused:
            raise refuse(PolicyDenied(decision.reason, rule=decision.rule), decision.rule)
        allowed = base | {"decision": "allowed", "reason": decision.reason, "rule": decision.rule}
        if action.custody != CUSTODY_ENCLAVE:
            answer.entries.append(
                allowed
                | {
                    "reason": f"{decision.reason}; {action.count} key(s) made by the host's "
                    f"{action.custody} custody"
                }
            )
            answer.outcomes.append({"approved": None})
            return
        most = most_keys_answered(allowed, wanted)
        if action.count > most:
            raise refuse(
                InvalidField(
                    f"count: at most {most} keys with these labels fit in one answer of the "
                    "enclave; ask for them in several requests",
                    field="count",
                ),
                decision.rule,
            )
        created: list[CreatedKey] = []
        failure: SigndError | None = None
        try:
            while len(created) < action.count:
                size = min(action.count - len(created), self._signer.max_batch)
                created.extend(self._signer.create_keys(action.chain, size, labels=wanted))
        except SigndError as exc:
            failure = exc  # the keys made before it are still returned, and audited
        for key in created:
            answer.keys.append(key.to_body())
            answer.entries.append(
                allowed | {"key_id": key.key_id, "result_sha256": sha256_hex(key.public_key)}
            )
        if failure is not None:
            raise refuse(failure, decision.rule)
        answer.outcomes.append({"created": len(created)})

    def _sign_calls(
        self,
        configured: _Configured,
        presented: _Presented,
        action: SignCalls,
        select: list[int],
        keys: Mapping[str, _Described],
        fills: Mapping[int, Mapping[str, Any]],
        answer: _Answer,
    ) -> None:
        slots = dict(zip(action.origins, action.calls, strict=True))
        together: SignTogether[ProvenKey] | None = None
        if len(select) >= PARALLEL_MIN:
            together = SignTogether(answer.entries)
        waiting: list[tuple[int, Waiting[ProvenKey]]] = []
        unsealing = self._signer.unsealing(
            described.sealed for described in keys.values() if described.sealed is not None
        )
        for origin in select:
            call = slots.get(origin)
            if call is None:
                answer.outcomes.append(_error(InvalidRequest(f"the request has no call {origin}")))
                continue
            if isinstance(call, SigndError):
                answer.outcomes.append(_error(call))
                continue
            fill = fills.get(origin)
            outcome: dict[str, Any] | Waiting[ProvenKey]
            try:
                run = together.run_of(call) if together is not None and not fill else None
                if run is not None:
                    assert together is not None
                    outcome = together.again(run, call)
                else:
                    outcome = self._sign_one(
                        configured, presented, call, fill, keys, answer, unsealing, together
                    )
            except SigndError as exc:
                answer.outcomes.append(_error(exc))
                continue
            if isinstance(outcome, Waiting):
                waiting.append((len(answer.outcomes), outcome))
                answer.outcomes.append({})  # its place, until its signature is made
            else:
                answer.outcomes.append(outcome)
        if together is not None:
            together.finish(configured.engine, ProvenKey.sign_many)
        for place, made in waiting:
            if made.error is not None:
                answer.outcomes[place] = _error(made.error)
            else:
                assert made.signature is not None
                answer.outcomes[place] = {
                    "signature": made.signature.to_bytes(),
                    "digest": made.digest,
                }

    def _sign_one(
        self,
        configured: _Configured,
        presented: _Presented,
        call: SigningCall,
        fill: Mapping[str, Any] | None,
        keys: Mapping[str, _Described],
        answer: _Answer,
        unsealing: Unsealing,
        together: SignTogether[ProvenKey] | None = None,
    ) -> dict[str, Any] | Waiting[ProvenKey]:
        """One call through the gate: its outcome, or (with ``together``, a call the policy
        decides on the key alone, with a key this enclave holds) its signature left to make
        with the others (:mod:`signd.gate.together`)."""
        principal = presented.principal
        base = self._entry(presented, _OPERATION_OF[call.kind])

        def refuse(error: SigndError, rule: str | None = None) -> SigndError:
            answer.entries.append(
                base | {"decision": "refused", "reason": error.message, "rule": rule}
            )
            return error

        lacking = switch_refusal(call.kind, configured.limits) or scope_refusal(
            principal, call.kind
        )
        if lacking is not None:
            raise refuse(lacking)
        described = keys.get(call.key)
        if described is None or not _names(call.key, described.info):
            raise refuse(KeyNotFound(f"no key {shown(call.key)}"))
        info, sealed = described
        base |= key_fields(info)
        proven: ProvenKey | None = None
        try:
            if fill:
                if call.kind is not SigningKind.ETH_TRANSACTION:
                    raise InvalidRequest("only a transaction has fields to fill")
                call = SigningCall(call.kind, call.key, apply_fills(call.payload, fill))
            if sealed is not None:
                proven = self._signer.proven_key(sealed, unsealing)
            if len(configured.decided) >= DECIDED_KEPT:
                configured.decided.clear()
            approval = approve(
                principal,
                call,
                info,
                configured.engine,
                configured.decided,
                policy=presented.in_force.policy,
            )
        except SigndError as exc:
            raise refuse(exc, rule_of(exc)) from None
        prepared = approval.prepared
        if together is not None and proven is not None and not prepared.facts and not fill:
            run = Run(
                info,
                base,
                approval.decision,
                approval.intent,
                partial(self._signer.proven_key, proven.reference, unsealing),
            )
            return together.start(call, run, proven, prepared.digest, prepared.assemble)
        return self._perform(configured, approval, base, answer, proven)

    def _perform(
        self,
        configured: _Configured,
        approval: Approval,
        base: AuditEntry,
        answer: _Answer,
        proven: ProvenKey | None,
    ) -> dict[str, Any]:
        """Sign an approved call with ``proven`` (an enclave key, proven while approving), or
        pass the approval to the host's custody."""
        decision, info, digest = approval.decision, approval.key, approval.prepared.digest
        outcome: dict[str, Any]
        result_sha256 = None
        reason = decision.reason

        def refuse(error: SigndError) -> SigndError:
            answer.entries.append(
                base | {"decision": "refused", "reason": error.message, "rule": decision.rule}
            )
            return error

        try:
            if proven is not None:
                signature = proven.sign_digest(digest)
                result = approval.prepared.assemble(signature)
                result_sha256 = sha256_hex(result_bytes(result))
                outcome = {"signature": signature.to_bytes(), "digest": digest}
            elif (device := self._hsm_reference(info)) is not None:
                assert self._hsm is not None
                raw = self._hsm.sign_digest(device, digest)
                try:  # the token object the host named must hold the key it described
                    signature = normalize_signature(raw, digest, info.public_key)
                except SigndError:
                    raise IntegrityError(
                        f"the HSM object named for key {info.key_id} signs with another key"
                    ) from None
                result = approval.prepared.assemble(signature)
                result_sha256 = sha256_hex(result_bytes(result))
                reason = f"{reason}; signed by the enclave's HSM"
                outcome = {"signature": raw, "digest": digest}
            else:
                reason = f"{reason}; signed by the host's {info.custody} custody"
                outcome = {"approved": digest}
        except SigndError as exc:  # the custody's own error, a refused credential included
            raise refuse(exc) from None
        except Exception as exc:  # a fault of a signing library: refused, on the record
            raise refuse(signing_fault(exc)) from None
        try:
            spend = configured.engine.commit(decision, approval.intent)
        except AccessDenied as exc:  # the spend window filled up meanwhile, or a reload
            raise refuse(PolicyDenied(exc.message, rule=decision.rule)) from None
        except SigndError as exc:
            raise refuse(exc) from None
        answer.entries.signed(
            base, reason=reason, rule=decision.rule, result_sha256=result_sha256, spend=spend
        )
        return outcome

    def _hsm_reference(self, info: KeyInfo) -> HsmKeyReference | None:
        """The token object of an HSM key this enclave holds, as the host named it."""
        cka_id = info.details.get("cka_id")
        if info.custody != CUSTODY_HSM or self._hsm is None or cka_id is None:
            return None
        return HsmKeyReference(info.key_id, bytes.fromhex(cka_id))

    def _entry(
        self, presented: _Presented, operation: str, *, chain: str | None = None
    ) -> AuditEntry:
        return caller_entry(
            presented.principal.client_id,
            presented.request_sha256,
            operation,
            presented.in_force,
            chain=chain,
        )

    def _seal(
        self,
        audit: AuditSigner,
        answer: _Answer,
        *,
        error: SigndError | None = None,
        result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The GATE answer, with its audit records sealed consecutively (so that the host
        can append them as one group)."""
        with self._seal_lock:
            audit = self._audit or audit
            sealed = [
                audit.seal(**{**entry, "reason": str(entry["reason"])[:MAX_REASON]})
                for entry in answer.entries.entries
            ]
        body: dict[str, Any] = dict(result or {})
        body |= {
            "outcomes": answer.outcomes,
            "keys": answer.keys,
            "audit": [record.to_json() for record in sealed],
        }
        if error is not None:
            body["error"] = error.to_dict()
        return body

    # audit verification

    def audit_verify(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """AUDIT_VERIFY: check a chunk of log lines, continuing from ``state`` (empty for
        the first chunk); the answer is the new state, the first problem, if any, and the
        configurations the chunk's verified records name (``policies``, as
        :class:`~signd.audit.PolicyRun` s: the host joins those of the chunks).

        ``audit_key`` is the MAC key's KMS ciphertext (absent: the key of the gate in force).
        It changes nothing the gate enforces: a key other than the gate's is unwrapped through
        KMS for verification only. ``against_chain_head`` says whether the key is the one this
        gate seals with: only then does ``final`` report a log that ends before this enclave's
        chain head as truncated."""
        lines = require_list(body, "records", max_length=MAX_VERIFY_CHUNK)
        state = _bytes(body, "state", limit=1024)
        final = body.get("final", False) is True
        mac_key, audit = self._verification_key(_bytes(body, "audit_key", limit=MAX_CONFIG_SIZE))
        position, head = self._verify_state(mac_key, state) if state else (0, GENESIS)
        problem: dict[str, Any] | None = None
        policies = PolicyRuns()
        for index, line in enumerate(lines):
            problem = _check_line(line, head, mac_key, position)
            if problem is not None:
                if problem["kind"] == "removed" and _appears(lines[index + 1 :], head.seq + 1):
                    problem |= {
                        "kind": "reordered",
                        "detail": f"comes before record {head.seq + 1}",
                    }
                break
            record = SealedAuditRecord.from_json(line)
            head = record.head
            policies.add(head.seq, record.record.policy_sha256, record.record.clients_sha256)
            position += 1
        if problem is None and final and audit is not None and audit.head.seq > head.seq:
            problem = {
                "position": position,
                "kind": "truncated",
                "detail": f"the log ends at record {head.seq}; the enclave has sealed "
                f"up to record {audit.head.seq}",
            }
        answer: dict[str, Any] = {
            "state": self._state_bytes(mac_key, position, head),
            "checked": position,
            "head": {"seq": head.seq, "hash": head.hash},
            "policies": [run.to_dict() for run in policies.runs],
            "against_chain_head": audit is not None,
        }
        if problem is not None:
            answer["problem"] = problem
        return answer

    def _verification_key(self, ciphertext: bytes) -> tuple[Secret, AuditSigner | None]:
        """The MAC key AUDIT_VERIFY checks with, and the gate's audit chain if that key is
        the gate's own: the gate's key when ``ciphertext`` is empty or the gate's; else
        ``ciphertext`` unwrapped through KMS (kept, by ciphertext, for the next chunks)."""
        if not ciphertext:
            _, in_force = self._in_force()
            assert self._audit_key is not None
            return self._audit_key, in_force
        with self._lock:
            own_key, own_ciphertext = self._audit_key, self._audit_key_ciphertext
            audit = self._audit
        if own_key is not None and hmac.compare_digest(ciphertext, own_ciphertext):
            return own_key, audit
        now = self._now()
        with self._verify_keys_lock:
            kept = self._verify_keys.get(ciphertext)
            if kept is not None and 0 <= now - kept[1] < VERIFY_KEY_AGE:
                self._verify_keys.move_to_end(ciphertext)
                return kept[0], None
        plaintext = self._kms.decrypt(ciphertext, encryption_context=AUDIT_KEY_CONTEXT)
        if len(plaintext.reveal_bytes()) != DATA_KEY_SIZE:
            raise IntegrityError("the audit key is not a KMS data key")
        with self._verify_keys_lock:
            self._verify_keys[ciphertext] = (plaintext, now)
            self._verify_keys.move_to_end(ciphertext)
            while len(self._verify_keys) > VERIFY_KEYS_KEPT:
                self._verify_keys.popitem(last=False)
        log.info("unwrapped an audit key for verification only (not the gate's)")
        return plaintext, None

    @staticmethod
    def _state_mac(mac_key: Secret, payload: bytes) -> bytes:
        key = hmac.new(mac_key.reveal_bytes(), _VERIFY_STATE_LABEL, hashlib.sha256).digest()
        return hmac.new(key, payload, hashlib.sha256).digest()

    def _state_bytes(self, mac_key: Secret, position: int, head: ChainHead) -> bytes:
        payload = cbor2.dumps([position, head.seq, head.hash])
        return payload + self._state_mac(mac_key, payload)

    def _verify_state(self, mac_key: Secret, state: bytes) -> tuple[int, ChainHead]:
        payload, mac = state[:-32], state[-32:]
        if len(state) <= 32 or not hmac.compare_digest(mac, self._state_mac(mac_key, payload)):
            raise IntegrityError("the verification state was not made by this enclave")
        position, seq, digest = cbor2.loads(payload)
        return position, ChainHead(seq, digest)


_OPERATION_OF: Final[Mapping[SigningKind, Operation]] = {
    SigningKind.HASH: Operation.SIGN_HASH,
    SigningKind.ETH_TRANSACTION: Operation.SIGN_TRANSACTION,
    SigningKind.ETH_MESSAGE: Operation.SIGN_MESSAGE,
    SigningKind.ETH_TYPED_DATA: Operation.SIGN_TYPED_DATA,
}


def _check_line(
    line: object, head: ChainHead, mac_key: Secret, position: int
) -> dict[str, Any] | None:
    """The problem with the log line after ``head``, or ``None``."""

    def problem(kind: str, detail: str, seq: int | None = None) -> dict[str, Any]:
        return {"position": position, "seq": seq, "kind": kind, "detail": detail}

    if not isinstance(line, str | bytes):
        return problem("unreadable", "a log line must be text")
    if len(line) > MAX_LINE_SIZE:
        return problem("unreadable", f"the line is longer than any audit record ({MAX_LINE_SIZE})")
    try:
        record = SealedAuditRecord.from_json(line)
    except IntegrityError as exc:
        return problem("unreadable", exc.message)
    seq = record.record.seq
    mac_ok, hash_ok = seal_is_valid(record, mac_key)
    if not mac_ok:
        return problem("altered", f"record {seq}: MAC does not verify", seq)
    if not hash_ok:
        return problem("altered", f"record {seq}: stored hash is not the record's", seq)
    if seq > head.seq + 1:
        return problem("removed", f"records {head.seq + 1}-{seq - 1} are missing", seq)
    if seq <= head.seq:
        return problem("reordered", f"record {seq} comes after record {head.seq}", seq)
    if record.prev_hash != head.hash:
        return problem("broken_link", f"prev_hash is not the hash of record {seq - 1}", seq)
    return None


def _appears(lines: Sequence[object], seq: int) -> bool:
    """Whether a later line of the chunk claims record ``seq`` (so it was moved, not removed)."""
    for line in lines:
        try:
            if (
                isinstance(line, str | bytes)
                and SealedAuditRecord.from_json(line).record.seq == seq
            ):
                return True
        except IntegrityError:
            continue
    return False


def _audit_tail(body: Mapping[str, Any]) -> list[SealedAuditRecord]:
    """GATE_CONFIGURE's ``audit_tail``: sealed log lines, oldest first (none when absent)."""
    if "audit_tail" not in body:
        return []
    lines = require_list(body, "audit_tail", max_length=MAX_TAIL_RECORDS)
    if not all(isinstance(line, str) and len(line) <= MAX_LINE_SIZE for line in lines):
        raise InvalidField("audit_tail must hold audit log lines", field="audit_tail")
    return [SealedAuditRecord.from_json(line) for line in lines]


def _ending_at(tail: list[SealedAuditRecord], digest: bytes) -> list[SealedAuditRecord]:
    """``tail`` up to the record whose hash is ``digest`` (empty if none is): the part of a
    chunk the windows still need, the later records having been replayed already."""
    ends = next((i for i, item in enumerate(tail) if item.hash == digest), -1)
    return tail[: ends + 1]


def _first_tail(
    mac_key: Secret, last: SealedAuditRecord | None, tail: list[SealedAuditRecord]
) -> list[SealedAuditRecord]:
    """The checked tail the first GATE_CONFIGURE starts the windows from: ``tail`` ending at
    the host's last record ``last`` (or ``last`` alone when no tail is sent)."""
    if last is None:
        if tail:
            raise IntegrityError("an audit tail was sent without the log's last record")
        return []
    chunk = tail or [last]
    check_tail(chunk, mac_key, ends_at=last.hash)
    return chunk


def _limit(body: Mapping[str, Any], name: str, default: int, maximum: int = 100_000) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidField(f"{name} must be an integer in 1..{maximum}", field=name)
    return value


def _rate(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 100_000  # NaN fails this too
    ):
        raise InvalidField(f"{name} must be a number in 0..100000", field=name)
    return float(value)


def _gate_request(value: object) -> GateRequest:
    if not isinstance(value, dict):
        raise InvalidField("request must be a map", field="request")
    method = require_str(value, "method", max_length=16)
    target = require_str(value, "target", max_length=MAX_TARGET)
    body = value.get("body")
    if not isinstance(body, bytes):
        raise InvalidField("request.body must be bytes", field="body")
    headers = value.get("headers", {})
    if (
        not isinstance(headers, dict)
        or len(headers) > MAX_HEADERS
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_HEADER_SIZE
            for k, v in headers.items()
        )
    ):
        raise InvalidField("request.headers must map names to text", field="headers")
    return GateRequest(method, target, body, headers)


def _key_descriptors(value: object) -> dict[str, _Described]:
    """The keys the host says the request names, by the reference the request uses."""
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise InvalidField(f"keys must be a list of at most {MAX_KEYS} maps", field="keys")
    found: dict[str, _Described] = {}
    for item in value:
        if not isinstance(item, dict):
            raise InvalidField("each key must be a map", field="keys")
        ref = require_str(item, "ref", max_length=MAX_NAME_LENGTH)
        custody = require_str(item, "custody", max_length=MAX_NAME_LENGTH)
        labels = item.get("labels", [])
        if not isinstance(labels, list):
            raise InvalidField("labels must be a list", field="labels")
        details = {}
        if custody == CUSTODY_ENCLAVE:
            details["blob"] = require_str(item, "blob", max_length=MAX_NAME_LENGTH)
        elif custody == CUSTODY_HSM and "cka_id" in item:  # a key of the enclave's own HSM
            details["cka_id"] = HsmKeyReference.from_body(item).cka_id.hex()
        info = KeyInfo(
            key_id=require_str(item, "key_id", max_length=MAX_NAME_LENGTH),
            chain=require_str(item, "chain", max_length=MAX_NAME_LENGTH),
            address=require_str(item, "address", max_length=MAX_NAME_LENGTH),
            public_key=require_bytes(item, "public_key", size=33),
            custody=custody,
            created_at=_DESCRIBED_AT,
            labels=canonical_labels(labels),
            details=details,
        )
        sealed = None
        if custody == CUSTODY_ENCLAVE:
            sealed = KeyReference(
                info.key_id, info.chain, info.address, details["blob"], info.labels
            )
        found[ref] = _Described(info, sealed)
    return found


def _fills(value: object) -> dict[int, Mapping[str, Any]]:
    if not isinstance(value, dict) or not all(
        isinstance(k, int) and isinstance(v, dict) for k, v in value.items()
    ):
        raise InvalidField("fills must map call origins to maps", field="fills")
    return value


def _select(value: object) -> list[int]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > MAX_SELECT
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidField("select must be a list of distinct call origins", field="select")
    return value


def _names(ref: str, info: KeyInfo) -> bool:
    """Whether the request's key reference ``ref`` names ``info`` (its id or its address)."""
    if ref == info.key_id:
        return True
    if ref.startswith(("0x", "0X")) and info.address.startswith(("0x", "0X")):
        return ref.lower() == info.address.lower()
    return ref == info.address


def _principal_body(principal: Principal) -> dict[str, Any]:
    return {
        "client_id": principal.client_id,
        "scopes": sorted(principal.scopes),
        "key_labels": sorted(principal.key_labels),
        "credential": principal.credential,
    }


def _error(error: SigndError) -> dict[str, Any]:
    return {"error": error.to_dict()}


def principal_from_body(body: Mapping[str, Any]) -> Principal:
    """The principal a GATE answer names (the host's copy, for logs and key reads)."""
    value = body.get("principal")
    if not isinstance(value, dict):
        raise InvalidField("principal must be a map", field="principal")
    credential = value.get("credential")
    if credential not in ("signature", "bearer"):
        raise InvalidField("principal.credential is unknown", field="principal")
    return Principal(
        require_str(value, "client_id"),
        frozenset(_strings(value, "scopes")),
        frozenset(_strings(value, "key_labels")),
        credential,
    )


def _strings(body: Mapping[str, Any], name: str) -> Sequence[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidField(f"{name} must be a list of text", field=name)
    return value
