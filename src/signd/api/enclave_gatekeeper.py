"""The host's side of the enclave's gate: :class:`EnclaveGatekeeper`.

It has the shape of :class:`~signd.gate.Gatekeeper` (``authenticate``, ``create_keys``,
``get_key``, ``list_keys``, ``sign``, ``reload``), so the API's two seams
(:mod:`signd.api.gatekeeping`) take either, but it decides nothing: every request goes to
the enclave (GATE, :mod:`signd.enclave.gate`) exactly as received, and the enclave
authenticates it, derives its calls from its bytes, applies the policy, signs (sealed keys)
or approves a digest (custody the host holds), and seals the audit records.

The host's part:

- find the keys a request names and describe them (the enclave proves a sealed key's
  labels by unsealing it; for other custody it takes the description on trust);
- match each call the API parsed to the call of the request it is (its *origin*), with the
  fields the host filled from its downstream node (a host that changed anything else finds
  no match, and the enclave would not sign it anyway);
- append the sealed audit records durably **before** releasing any result;
- check each signature against the key's public key, sign approved digests with its own
  custody, and assemble the results;
- hand the enclave its configuration (GATE_CONFIGURE) at start, on reload and when the
  enclave comes back empty after a restart; keep the audit MAC key's KMS ciphertext
  (``audit.key.sealed``), whose plaintext it never sees.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NamedTuple, cast

from signd.audit import PolicyRun, PolicyRuns, SealedAuditRecord
from signd.audit.lines import LogLines
from signd.audit.log import DEFAULT_ORDER_TIMEOUT, deferring_appends, store_records
from signd.audit.tail import read_tail
from signd.auth import Scope
from signd.auth.reload import ReloadHistory, ReloadRefusal, ReloadStatus, read_settled
from signd.chains import address_deriver
from signd.crypto.secp256k1 import RecoverableSignature, check_digest
from signd.custody.base import KeyInfo, KeyPage, check_labels, device_signature
from signd.custody.enclave import EnclaveBackend
from signd.enclave.channel import Connect, EnclaveChannel, NotSent
from signd.enclave.client import EnclaveClient
from signd.enclave.gate import (
    MAX_LINE_SIZE,
    MAX_TAIL_RECORDS,
    UNCONFIGURED,
    principal_from_body,
)
from signd.enclave.protocol import (
    CreatedKey,
    HsmKeyReference,
    KeyReference,
    MessageType,
    error_from_body,
)
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidRequest,
    SigndError,
)
from signd.gate.errors import BlindSigningDisabled, OutOfScope, PolicyDenied, Unauthenticated
from signd.gate.intents import hash_result, prepare
from signd.gate.interpret import (
    FILLABLE,
    Action,
    CreateKeys,
    Limits,
    SignCalls,
    apply_fills,
    interpret,
)
from signd.gate.keeper import (
    Caller,
    GateRequest,
    each_alone,
    labels_refusal,
    require_scope,
    visible_page,
    warn_unrecorded,
)
from signd.gate.operations import Runner, Signed, SigningCall, SigningKind, SigningResult
from signd.gate.setup import GatePaths, open_audit_log, write_private
from signd.operations import Signer
from signd.policy import Policy, SpendWindowsUnavailable
from signd.policy.engine import longest_window

log = logging.getLogger("signd.gate")

NOT_IN_REQUEST: Final = "the call is not one the authenticated request asks for"
TAIL_CHUNK_BYTES: Final = 256 * 1024
"""The most audit log bytes one GATE_CONFIGURE carries (with both files, under a frame)."""
APPENDS_TIMEOUT: Final = 2 * DEFAULT_ORDER_TIMEOUT
"""Seconds GATE_CONFIGURE waits for the audit records on their way to the log (a record
waits at most :data:`~signd.audit.log.DEFAULT_ORDER_TIMEOUT` for those before it, then
for its write)."""
TAIL_CLOCK_MARGIN: Final = 300.0
"""Seconds of audit log read back beyond the longest spend window, for the enclave's clock."""
_GATE_ERRORS: Final[Mapping[str, type[SigndError]]] = {
    Unauthenticated.code: Unauthenticated,
    OutOfScope.code: OutOfScope,
    BlindSigningDisabled.code: BlindSigningDisabled,
    SpendWindowsUnavailable.code: SpendWindowsUnavailable,
}


def gate_error(body: Mapping[str, Any]) -> SigndError:
    """The error an enclave answer carries, as the class that raised it there."""
    code = body.get("code")
    message = body.get("message")
    if code == PolicyDenied.code and isinstance(message, str):
        rule = body.get("rule")
        return PolicyDenied(message, rule=rule if isinstance(rule, str) else None)
    cls = _GATE_ERRORS.get(code) if isinstance(code, str) else None
    if cls is not None and isinstance(message, str):
        return cls(message)
    return error_from_body(body)


@dataclass(slots=True)
class _Session:
    """What the host keeps about an authenticated request while serving it: what it asks
    for, and which of its calls have been sent to the enclave."""

    action: Action | SigndError
    claimed: _Claims = field(default_factory=lambda: _Claims())
    """Which of the request's calls (by position) have been sent to the enclave."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    performed: tuple[_Signing, dict[str, Any]] | None = None
    """Calls the enclave performed with the authentication (one round trip), and its
    answer: :meth:`EnclaveGatekeeper.sign` takes their outcomes from there."""


@dataclass(slots=True)
class _Claims:
    """Positions of a list, each taken at most once; searched from the first free one,
    since calls usually come in the request's order (a 1,000-call batch is then one pass)."""

    taken: set[int] = field(default_factory=set)
    first_free: int = 0

    def take_all(self, count: int) -> bool:
        """Take every position below ``count`` if none is taken yet; else take none."""
        if self.first_free or self.taken:
            return False
        self.taken.update(range(count))
        self.first_free = count
        return True

    def take(self, count: int, fits: Callable[[int], bool]) -> int | None:
        """The first free position below ``count`` that ``fits``, now taken; else ``None``."""
        for position in range(self.first_free, count):
            if position not in self.taken and fits(position):
                self.taken.add(position)
                while self.first_free in self.taken:
                    self.first_free += 1
                return position
        return None


@dataclass(slots=True)
class _Signing:
    """A signing request on its way through the enclave: the calls matched to the
    request's, their keys (found, or the error finding them), and the outcomes so far."""

    request: GateRequest
    outcomes: list[Signed | Exception]
    matched: list[_Matched] = field(default_factory=list)
    infos: dict[str, KeyInfo] = field(default_factory=dict)
    missing: dict[str, SigndError] = field(default_factory=dict)
    keys: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    """Nothing to send: every outcome is final."""
    handed: _Claims = field(default_factory=lambda: _Claims())
    """Positions in ``matched`` whose outcome :meth:`EnclaveGatekeeper._hand_out` gave."""
    raw: list[Any] | None = None
    """The enclave's outcome of each call, once read."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, call: SigningCall) -> int | None:
        """The first position not yet handed out whose call is ``call`` exactly, taken."""
        return self.handed.take(
            len(self.matched), lambda position: _fills_for(self.matched[position].call, call) == {}
        )

    def gate_arguments(self) -> dict[str, Any]:
        return {
            "select": [item.origin for item in self.matched],
            "keys": self.keys,
            "fills": {item.origin: item.fills for item in self.matched if item.fills},
        }


def _connect_with(run: Runner) -> Connect:
    """Connecting to the enclave (which may start the local one) in ``run``'s thread."""

    async def connect(
        open_socket: Callable[[float], socket.socket], timeout: float
    ) -> socket.socket:
        sock: socket.socket = await run(open_socket, timeout)
        return sock

    return connect


def _calls_of(action: Action | SigndError) -> tuple[SigningCall, ...] | None:
    """The calls of a request that asks only for signatures (all well formed), else ``None``."""
    if not isinstance(action, SignCalls) or not action.calls:
        return None
    if not all(isinstance(call, SigningCall) for call in action.calls):
        return None
    return cast(tuple[SigningCall, ...], action.calls)


def _performable(action: Action | SigndError, kinds: frozenset[SigningKind]) -> list[SigningCall]:
    """The calls of a request that asks only for signatures of ``kinds`` (all well formed),
    else none."""
    if not kinds or not isinstance(action, SignCalls) or not action.calls:
        return []
    calls = [call for call in action.calls if isinstance(call, SigningCall)]
    if len(calls) != len(action.calls) or any(call.kind not in kinds for call in calls):
        return []
    return calls


def _gate_body(
    request: GateRequest,
    select: Sequence[int] | None,
    keys: Sequence[dict[str, Any]],
    fills: Mapping[int, Mapping[str, Any]] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request": {
            "method": request.method,
            "target": request.path,
            "body": request.body,
            "headers": dict(request.headers),
        },
        "keys": list(keys),
        "fills": dict(fills or {}),
    }
    if select is not None:
        body["select"] = list(select)
    return body


class _Matched(NamedTuple):
    """A call the API parsed (at ``position`` among those it handed over), matched to the
    request's call ``origin``. A tuple: made for every call of a batch, it costs a third of
    a frozen dataclass."""

    position: int
    call: SigningCall
    origin: int
    fills: dict[str, Any]


class EnclaveGatekeeper:
    """Keys and signatures through the enclave's gate; thread-safe, blocking.

    ``signer`` finds keys (all custody) and signs what the enclave approves for custody the
    host holds; ``client`` reaches the enclave; ``paths`` are the clients, policy and audit
    files. Call :meth:`configure` once before serving.
    """

    def __init__(
        self,
        client: EnclaveClient,
        signer: Signer,
        paths: GatePaths,
        *,
        node: str,
        limits: Limits | None = None,
    ) -> None:
        self.client = client
        self.signer = signer
        self.paths = paths
        self.node = node
        self.limits = limits or Limits()
        self.audit = open_audit_log(paths.audit_log)
        self.clients_sha256 = ""
        self.policy_sha256 = ""
        self._in_force: tuple[bytes, bytes] | None = None
        """The clients and policy files' bytes the enclave last accepted: what a restarted
        enclave is given again (the files may have changed since, unsignalled)."""
        self._configure_lock = threading.Lock()
        self._resume_wanted = False
        """An append failed: have the enclave resume from the log before the next GATE."""
        self._resuming = False
        self._resume_lock = threading.Lock()
        self._epoch = 0
        """How many resumes have begun. A GATE is tagged with the epoch it was sent in;
        its records failing to append ask for a resume only when no resume has begun since
        (the records of GATEs the enclave answered before a resume follow the lost ones,
        and are expected to fail: resuming again for them would fail the next ones, and so
        on, for as long as requests keep coming)."""
        self._event_channel: EnclaveChannel | None = None
        self._reloads = ReloadHistory()

    def __repr__(self) -> str:
        return f"EnclaveGatekeeper(client={self.client!r}, audit={self.audit!r})"

    def close(self) -> None:
        """Close the audit log and the event loop's channel (the signer and the client
        belong to the caller)."""
        if self._event_channel is not None:
            self._event_channel.close()
        self.audit.close()

    def check_audit(self) -> None:
        """Whether the audit log can take records: nothing is signed while it cannot."""
        self.audit.check_health()

    # configuration

    def configure(self, *, resume: bool = False, reread: bool = True) -> None:
        """Send the clients and policy files and the audit key to the enclave (GATE_CONFIGURE).

        A bad file raises :class:`~signd.errors.ConfigurationError` and the enclave keeps
        the configuration in force. Without ``reread`` (a restarted enclave, a resume) the
        files the enclave last accepted are sent again, not the files as they are now: an
        edit not yet signalled, or half written, takes effect only on a reload. On first run
        the enclave makes the audit MAC key and the host stores its KMS ciphertext. The audit
        log's tail over the policy's longest spend window goes along (in chunks, newest first,
        while the enclave says its windows are not yet whole), so that a restarted enclave
        rebuilds its spend windows. ``resume``: the log lost records the enclave sealed; the
        enclave continues from the log's last record and seals a record saying so.
        """
        paths = self.paths
        with self._configure_lock:
            sealed_key = _read(paths.sealed_audit_key_file, missing_ok=True)
            # An enclave that restarted rebuilds its windows from the log's tail: records an
            # earlier one sealed, still on their way to the log, must be in it (their results
            # are released once they are), or their spends would be left out.
            self.audit.wait_for_appends(APPENDS_TIMEOUT)
            last = self.audit.last_record()
            if self._in_force is None:  # start-up
                clients_data, policy_data = _read(paths.clients_file), _read(paths.policy_file)
            elif reread:
                clients_data = read_settled("clients", paths.clients_file)
                policy_data = read_settled("policy", paths.policy_file)
            else:
                clients_data, policy_data = self._in_force
            chunks = _tail_chunks(paths, last, policy_data)
            if not sealed_key and last is not None:
                raise ConfigurationError(
                    f"{paths.sealed_audit_key_file} is missing or empty but the audit log "
                    f"{paths.audit_log} is not empty: restore the key file"
                )
            body: dict[str, Any] = {
                "clients": clients_data,
                "policy": policy_data,
                "audit_key": sealed_key,
                "audit_head": b"" if last is None else last.to_json().encode("ascii"),
                "audit_tail": chunks.pop() if chunks else [],
                "node": self.node,
                "max_batch": self.limits.max_batch,
                "max_keys_per_request": self.limits.max_keys_per_request,
                "allow_blind_signing": self.limits.allow_blind_signing,
                "auth_failure_audit_rate": self.limits.auth_failure_audit_rate,
                "auth_failure_audit_burst": self.limits.auth_failure_audit_burst,
                "nonce_capacity": self.limits.nonce_capacity,
                "nonce_quota": self.limits.nonce_quota,
            }
            if resume:
                body["resume"] = True
            answer = self.client.request(MessageType.GATE_CONFIGURE, body)
            self._in_force = (clients_data, policy_data)
            resumed = answer.get("audit")
            if isinstance(resumed, list) and resumed:  # the record saying what was lost
                self.audit.append_many([SealedAuditRecord.from_json(line) for line in resumed])
            while answer.get("windows_ready") is False and chunks:
                body |= {"audit_tail": chunks.pop(), "resume": False}
                answer |= self.client.request(MessageType.GATE_CONFIGURE, body)
            if answer.get("windows_ready") is False:
                log.error(
                    "the enclave could not rebuild its spend windows from %s: requests under "
                    "rules with spend windows are refused (spend_windows_unavailable)",
                    paths.audit_log,
                )
            new_key = answer.get("audit_key")
            if isinstance(new_key, bytes) and new_key:
                write_private(paths.sealed_audit_key_file, new_key)
                log.warning(
                    "created the audit MAC key in the enclave; its KMS ciphertext is %s "
                    "(keep it: the audit log cannot be verified without it)",
                    paths.sealed_audit_key_file,
                )
            self.clients_sha256 = str(answer.get("clients_sha256", ""))
            self.policy_sha256 = str(answer.get("policy_sha256", ""))
        log.info(
            "enclave gate: clients %s (sha256 %s), policy %s (sha256 %s), audit log %s at seq %s",
            paths.clients_file,
            self.clients_sha256,
            paths.policy_file,
            self.policy_sha256,
            paths.audit_log,
            answer.get("seq"),
        )

    def reload(self) -> ReloadRefusal | None:
        """Send the files again; the enclave puts both in force or neither (a bad one is
        refused and the ones in force stay). The refusal, naming the files the host could
        not read or the enclave refused (``None`` when both were put in force); the outcome
        is kept for :meth:`reload_status`."""
        return self._reloads.run(self._reload_files)

    def _reload_files(self) -> ReloadRefusal | None:
        try:
            self.configure()
        except SigndError as exc:
            return ReloadRefusal.of(exc)
        return None

    def reload_status(self) -> ReloadStatus:
        """How the last reload went, and the SHA-256 of the files the enclave has in force."""
        return self._reloads.status(self.clients_sha256 or None, self.policy_sha256 or None)

    # the enclave round trip

    def _gate(
        self,
        request: GateRequest,
        *,
        select: Sequence[int] | None = None,
        keys: Sequence[dict[str, Any]] = (),
        fills: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One GATE: the answer, once its audit records are durable in the log (inside
        :func:`~signd.audit.log.deferring_appends`: once they are submitted)."""
        answer, epoch = self._ask(request, select, keys, fills)
        self._append(answer.get("audit"), epoch)
        return answer

    def _ask(
        self,
        request: GateRequest,
        select: Sequence[int] | None,
        keys: Sequence[dict[str, Any]],
        fills: Mapping[int, Mapping[str, Any]] | None,
    ) -> tuple[dict[str, Any], int]:
        """One GATE, its records not yet appended: the answer, and the epoch it was sent in
        (for :meth:`_append`)."""
        body = _gate_body(request, select, keys, fills)
        epoch = self._resumed_epoch()
        late = partial(self._late_answer, epoch)
        try:
            answer = self.client.request(MessageType.GATE, body, late=late)
        except ConfigurationError as exc:
            if exc.message != UNCONFIGURED:
                raise
            log.warning("the enclave has lost its gate configuration (restarted?); sending it")
            self.configure(reread=False)
            answer = self.client.request(MessageType.GATE, body, late=late)
        return answer, epoch

    def _resumed_epoch(self) -> int:
        """The epoch to send a GATE in, once a resume that is wanted or under way is over
        (blocking: one thread resumes, the others wait for it)."""
        if self._resume_wanted or self._resuming:
            with self._resume_lock:
                if self._resume_wanted:
                    self._resuming = True
                    self._resume_wanted = False
                    self._epoch += 1
                    try:
                        self._resume()
                    finally:
                        self._resuming = False
        return self._epoch

    async def _gate_async(
        self,
        request: GateRequest,
        run: Runner,
        *,
        select: Sequence[int] | None = None,
        keys: Sequence[dict[str, Any]] = (),
        fills: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """:meth:`_gate` without a thread: the request goes out on the open connection and
        its answer is awaited. Whatever may block (connecting, resuming the audit chain,
        configuring a restarted enclave) is left to :meth:`_gate`, in ``run``'s thread."""
        if self._resume_wanted or self._resuming:
            return await self._gate_in_thread(request, run, select, keys, fills)
        body = _gate_body(request, select, keys, fills)
        epoch = self._epoch
        late = partial(self._late_answer, epoch)
        try:
            answer = await self._channel().request(
                MessageType.GATE, body, _connect_with(run), late=late
            )
        except NotSent:  # connecting failed: the blocking client retries and reports
            return await self._gate_in_thread(request, run, select, keys, fills)
        except ConfigurationError as exc:
            if exc.message != UNCONFIGURED:
                raise
            return await self._gate_in_thread(request, run, select, keys, fills)
        self._append(answer.get("audit"), epoch)
        return answer

    def _channel(self) -> EnclaveChannel:
        """The event loop's connection to the enclave (made on first use)."""
        if self._event_channel is None:
            self._event_channel = EnclaveChannel(self.client.link)
        return self._event_channel

    async def _gate_in_thread(
        self,
        request: GateRequest,
        run: Runner,
        select: Sequence[int] | None,
        keys: Sequence[dict[str, Any]],
        fills: Mapping[int, Mapping[str, Any]] | None,
    ) -> dict[str, Any]:
        answer: dict[str, Any] = await run(
            partial(self._gate, request, select=select, keys=keys, fills=fills)
        )
        return answer

    def _append(self, lines: object, epoch: int, *, wait: bool = False) -> None:
        """Append the enclave's sealed records of a GATE sent in ``epoch``; nothing is
        released unless this succeeds (inside :func:`~signd.audit.log.deferring_appends`,
        unless ``wait``, the caller waits for it)."""
        if not isinstance(lines, list):
            raise DependencyUnavailable("the enclave sent no audit records")
        records = [SealedAuditRecord.from_json(line) for line in lines]
        store_records(self.audit, records, failed=partial(self._append_failed, epoch), wait=wait)

    def _late_answer(self, epoch: int, answer: Mapping[str, Any]) -> None:
        """The answer to a GATE sent in ``epoch`` whose caller stopped waiting (it was
        answered 503, or went away): its results go to no one, but its sealed records are
        part of the chain, so they are appended in their place, lest the records sealed
        after them wait for them in vain. Never blocks (the channel's event loop, or the
        client's reader thread, calls it)."""
        lines = answer.get("audit")
        if isinstance(lines, list) and lines:
            # A failure is logged by _append_failed, which also asks for a resume.
            with deferring_appends() as appends, contextlib.suppress(SigndError):
                self._append(lines, epoch)
            for audit_log in appends.logs:
                audit_log.wake()
        made = answer.get("keys")
        if isinstance(made, list) and made:
            log.warning(
                "the enclave made %d key(s) after their request had stopped waiting: they "
                "were not recorded, and their addresses were given to no one: %s",
                len(made),
                ", ".join(str(key.get("key_id")) for key in made if isinstance(key, dict)),
            )

    def _append_failed(self, epoch: int, exc: BaseException) -> None:
        why = exc.message if isinstance(exc, SigndError) else type(exc).__name__
        log.error("audit log append failed; the results are withheld: %s", why)
        if epoch == self._epoch:  # else a resume since its GATE has seen to it
            self._resume_wanted = True

    def _resume(self) -> None:
        """After records were lost on their way to the log, have the enclave continue the
        chain from the log's last record; if that fails, the next GATE tries again (a
        create refused while the log is down sends no GATE whose failure would ask)."""
        try:
            self.configure(resume=True, reread=False)
        except SigndError as exc:
            log.error("could not resume the audit chain: %s", exc.message)
            self._resume_wanted = True

    # authentication

    def authenticate(self, request: GateRequest) -> Caller:
        """The caller as the enclave authenticated it, or the refusal (audited there)."""
        return self._authenticated(request, self._gate(request))

    async def authenticate_async(
        self, request: GateRequest, run: Runner, perform: frozenset[SigningKind] = frozenset()
    ) -> Caller:
        """:meth:`authenticate` without a thread (see :meth:`_gate_async`).

        ``perform``: when the request asks only for signatures of these kinds, the enclave
        authenticates it and performs all its calls in the same round trip, and :meth:`sign`
        later hands out their outcomes. The caller passes the kinds nothing on the host may
        refuse after authentication (so that no signing is audited as allowed and then
        withheld), and none when a per-client rate limit follows authentication.
        """
        session = _Session(self._interpret(request))
        calls = _performable(session.action, perform)
        if not calls:
            return self._authenticated(request, await self._gate_async(request, run), session)
        if all(map(self.signer.key_is_known, {call.key for call in calls})):
            signing = self._prepare(request, session, calls)
        else:
            signing = await run(self._prepare, request, session, calls)
        answer = await self._gate_async(request, run, **signing.gate_arguments())
        caller = self._authenticated(request, answer, session, performed=True)
        session.performed = (signing, answer)
        return caller

    def _interpret(self, request: GateRequest) -> Action | SigndError:
        try:
            return interpret(request.method, request.path, request.body, limits=self.limits)
        except SigndError as exc:
            return exc

    def _authenticated(
        self,
        request: GateRequest,
        answer: Mapping[str, Any],
        session: _Session | None = None,
        *,
        performed: bool = False,
    ) -> Caller:
        """The caller the enclave's answer names, or its refusal. With calls ``performed``,
        an error after authentication (the answer names the principal) belongs to the calls
        and is handed out by :meth:`sign`."""
        error = answer.get("error")
        if isinstance(error, dict) and not (performed and "principal" in answer):
            raise gate_error(error)
        principal = principal_from_body(answer)
        session = session or _Session(self._interpret(request))
        return Caller(principal, request.sha256, request, session, _calls_of(session.action))

    @staticmethod
    def _presented(caller: Caller) -> tuple[GateRequest, _Session]:
        if caller.request is None or not isinstance(caller.session, _Session):
            raise Unauthenticated("the request was not authenticated by the enclave")
        return caller.request, caller.session

    # keys

    def create_keys(
        self, caller: Caller, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        """``keys:create``, decided (and, for sealed keys, done) by the enclave.

        Nothing is asked of the enclave while the audit log is known to take no records
        (503), and the answer's records are durable before the host records a sealed key
        or makes one the enclave approved. If they cannot be written, the caller gets the
        error: sealed keys the enclave made are then never recorded (unusable, as a blob
        whose write failed), and a warning names them (:func:`warn_unrecorded`)."""
        request, session = self._presented(caller)
        wanted = check_labels(labels)
        if isinstance(session.action, SigndError):
            raise session.action
        if session.action != CreateKeys(chain, custody, count, tuple(labels)):
            raise InvalidRequest(NOT_IN_REQUEST)
        address_of = address_deriver(chain)
        backend = self.signer.backend(custody)
        self.check_audit()
        answer, epoch = self._ask(request, [0], (), None)
        made = [CreatedKey.from_body(key) for key in answer.get("keys", [])]
        try:
            self._append(answer.get("audit"), epoch, wait=True)
        except Exception as exc:
            if made:
                warn_unrecorded(custody, [key.key_id for key in made], exc)
            raise
        created: list[KeyInfo] = []
        if made:
            if not isinstance(backend, EnclaveBackend):
                raise IntegrityError("the enclave made keys for custody it does not hold")
            created = backend.record_keys(chain, address_of, made, wanted)
        error = answer.get("error")
        if isinstance(error, dict):
            raise gate_error(error)
        [outcome] = answer.get("outcomes", [None])
        if isinstance(outcome, dict) and "approved" in outcome:
            return self.signer.create_keys(chain=chain, custody=custody, count=count, labels=wanted)
        if len(created) != count:
            raise DependencyUnavailable(f"the enclave made {len(created)} keys, not {count}")
        return created

    def get_key(self, caller: Caller, ref: str) -> KeyInfo:
        """``keys:read`` (checked, and refusals audited, by the enclave when the request is a
        key read); only a key the client may use (by the host's records)."""
        require_scope(caller.principal, Scope.KEYS_READ)
        info = self.signer.get_key(ref)
        if not caller.principal.may_use(info.labels):
            raise labels_refusal(caller.client_id, info)
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
        require_scope(caller.principal, Scope.KEYS_READ)
        page = self.signer.list_keys(
            custody=custody, chain=chain, label=label, cursor=cursor, limit=limit
        )
        return visible_page(caller.principal, page)

    # signatures

    def signs_inline(self, calls: Sequence[SigningCall]) -> bool:
        """Never: signing is a round trip to the enclave."""
        return False

    def sign(self, caller: Caller, calls: Sequence[SigningCall]) -> list[Signed | Exception]:
        """Sign ``calls`` through the enclave; each one's result or the error it met. The
        audit records come back with the answer and are appended before anything is
        returned; if that fails, every result is withheld (the error takes its place)."""
        request, session = self._presented(caller)
        if session.performed is not None:
            return self._hand_out(session.performed, calls)
        signing = self._prepare(request, session, calls)
        if signing.done:
            return signing.outcomes
        try:
            answer = self._gate(signing.request, **signing.gate_arguments())
        except Exception as exc:
            return [exc for _ in calls]
        return self._complete(signing, answer)

    async def sign_each_async(
        self, requests: Sequence[tuple[Caller, Sequence[SigningCall]]], run: Runner
    ) -> list[list[Signed | Exception] | Exception]:
        """:meth:`sign_async` of each request, concurrently: each goes to the enclave with
        its own authentication (a REST signing request was performed with it already)."""
        return await each_alone(self.sign_async, requests, run)

    def performed(self, caller: Caller, call: SigningCall) -> Signed | Exception | None:
        """``call``'s outcome when the enclave performed it with the authentication and
        handing it out needs no I/O here (its key is the enclave's, or signs in this
        process); else ``None``, and :meth:`sign_async` is the way. The audit records of a
        performed call were durable before its caller was returned, so a REST signing
        request needs nothing more of the gate than this."""
        session = caller.session
        if not isinstance(session, _Session) or session.performed is None:
            return None
        if not self._hands_out_inline(session.performed[0]):
            return None
        [outcome] = self._hand_out(session.performed, [call])
        return outcome

    def _hands_out_inline(self, signing: _Signing) -> bool:
        """Whether handing out ``signing``'s outcomes needs no I/O: a digest the enclave
        approved for other custody is signed here, by a device unless the key is local."""
        return all(
            info.custody == EnclaveBackend.custody_type or self.signer.key_is_local(info.key_id)
            for info in signing.infos.values()
        )

    async def sign_async(
        self, caller: Caller, calls: Sequence[SigningCall], run: Runner
    ) -> list[Signed | Exception]:
        """:meth:`sign` without a thread when the keys are known and what the enclave
        approves needs no I/O here (see :meth:`_gate_async`); otherwise those steps run in
        ``run``'s thread."""
        request, session = self._presented(caller)
        if session.performed is not None:
            if self._hands_out_inline(session.performed[0]):
                return self._hand_out(session.performed, calls)
            handed: list[Signed | Exception] = await run(self._hand_out, session.performed, calls)
            return handed
        if all(map(self.signer.key_is_known, {call.key for call in calls})):
            signing = self._prepare(request, session, calls)
        else:
            signing = await run(self._prepare, request, session, calls)
        if signing.done:
            return signing.outcomes
        try:
            answer = await self._gate_async(signing.request, run, **signing.gate_arguments())
        except Exception as exc:
            return [exc for _ in calls]
        if self._hands_out_inline(signing):
            return self._complete(signing, answer)
        outcomes: list[Signed | Exception] = await run(self._complete, signing, answer)
        return outcomes

    def _hand_out(
        self, performed: tuple[_Signing, dict[str, Any]], calls: Sequence[SigningCall]
    ) -> list[Signed | Exception]:
        """The outcomes of ``calls`` among those performed with the authentication (each
        call of the request once, in any grouping, as a batch is signed in chunks)."""
        signing, answer = performed
        with signing.lock:
            if signing.raw is None:
                signing.raw = self._complete(signing, answer, finish=False)
            outcomes = signing.raw
            matched = signing.matched
            handed: list[Any]
            if _same_calls([item.call for item in matched], calls) and signing.handed.take_all(
                len(matched)
            ):  # the request's calls, all at once and in order (a whole batch)
                handed = [outcomes[item.position] for item in matched]
            else:
                found = [signing.claim(call) for call in calls]
                handed = [
                    InvalidRequest(NOT_IN_REQUEST) if at is None else outcomes[matched[at].position]
                    for at in found
                ]
        return [
            self._finish_one(signing, call, outcome) if isinstance(outcome, dict) else outcome
            for call, outcome in zip(calls, handed, strict=True)
        ]

    def _prepare(
        self, request: GateRequest, session: _Session, calls: Sequence[SigningCall]
    ) -> _Signing:
        """Match the calls to the request's, find and describe their keys."""
        unread = session.action  # the enclave could not read the request: say why
        refusal = unread if isinstance(unread, SigndError) else InvalidRequest(NOT_IN_REQUEST)
        signing = _Signing(request, [refusal for _ in calls])
        signing.matched = self._match(session, calls)
        if not signing.matched:
            signing.done = True
            return signing
        for item in signing.matched:
            key = item.call.key
            if key not in signing.infos and key not in signing.missing:
                try:
                    signing.infos[key] = self.signer.get_key(key)
                except SigndError as exc:  # the enclave refuses (and audits) the call
                    signing.missing[key] = exc
        signing.keys = [self._describe(ref, info) for ref, info in signing.infos.items()]
        return signing

    def _complete(
        self, signing: _Signing, answer: Mapping[str, Any], *, finish: bool = True
    ) -> list[Any]:
        """The results from the enclave's answer (approved digests signed here); with
        ``finish=False``, each call's raw outcome (or its error) for :meth:`_hand_out`."""
        outcomes: list[Any] = list(signing.outcomes)
        error = answer.get("error")
        if isinstance(error, dict):
            failure = gate_error(error)
            return [failure for _ in outcomes]
        results = answer.get("outcomes")
        if not isinstance(results, list) or len(results) != len(signing.matched):
            failure = DependencyUnavailable("the enclave answered the wrong number of calls")
            return [failure for _ in outcomes]
        for item, result in zip(signing.matched, results, strict=True):
            if item.call.key in signing.missing:
                outcomes[item.position] = signing.missing[item.call.key]
            elif not finish:
                outcomes[item.position] = result if isinstance(result, dict) else {}
            else:
                outcomes[item.position] = self._finish_one(signing, item.call, result)
        return outcomes

    def _finish_one(
        self, signing: _Signing, call: SigningCall, result: object
    ) -> Signed | Exception:
        try:
            return self._finish(call, signing.infos.get(call.key), result)
        except Exception as exc:
            return exc

    def _match(self, session: _Session, calls: Sequence[SigningCall]) -> list[_Matched]:
        """Each call the request asks for, with its origin and the host's fills; a call
        that is not one of them (or is one already claimed) gets none."""
        action = session.action
        if not isinstance(action, SignCalls):
            return []
        matched: list[_Matched] = []
        asked = action.calls
        with session.lock:
            if _same_calls(asked, calls) and session.claimed.take_all(len(asked)):
                origins = zip(calls, action.origins, strict=True)
                return [  # the API took the request's calls as the gate read them
                    _Matched(position, call, origin, {})
                    for position, (call, origin) in enumerate(origins)
                ]
            for position, call in enumerate(calls):
                asked_at = session.claimed.take(len(asked), _fitting(asked, call))
                fills = None if asked_at is None else _fills_from(asked[asked_at], call)
                if asked_at is not None and fills is not None:
                    matched.append(_Matched(position, call, action.origins[asked_at], fills))
        return matched

    def _describe(self, ref: str, info: KeyInfo) -> dict[str, Any]:
        """A key as the enclave is shown it: its facts and the labels claimed for it (a
        sealed key's blob proves them; for other custody they are the host's word)."""
        body: dict[str, Any] = {
            "ref": ref,
            "key_id": info.key_id,
            "chain": info.chain,
            "address": info.address,
            "public_key": info.public_key,
            "custody": info.custody,
            "labels": list(info.labels),
        }
        backend = self.signer.backend(info.custody)
        if isinstance(backend, EnclaveBackend):  # the enclave signs it: name what with
            reference = backend.reference(info)
            if isinstance(reference, KeyReference):
                body["blob"] = reference.blob
                body["labels"] = list(reference.labels)
            elif isinstance(reference, HsmKeyReference):
                body["cka_id"] = reference.cka_id
        return body

    def _finish(self, call: SigningCall, info: KeyInfo | None, result: object) -> Signed:
        """The result of one call from the enclave's outcome."""
        if not isinstance(result, dict):
            raise DependencyUnavailable("the enclave sent a malformed outcome")
        if isinstance(result.get("error"), dict):
            raise gate_error(result["error"])
        if info is None:
            raise DependencyUnavailable("the enclave decided a call for a key it was not shown")
        assemble: Callable[[RecoverableSignature], SigningResult]
        if call.kind is SigningKind.HASH:  # what prepare() gives, without its Prepared: a
            # large batch is mostly hash calls, and this runs for each one
            digest, assemble = check_digest(call.payload), hash_result
        else:
            prepared = prepare(call.kind, call.payload, info)
            digest, assemble = prepared.digest, prepared.assemble
        if result.get("digest", result.get("approved")) != digest:
            raise IntegrityError("the enclave decided another digest than this call's")
        signature_bytes = result.get("signature")
        if isinstance(signature_bytes, bytes) and info.custody == EnclaveBackend.custody_type:
            # Made by libsecp256k1 in the attested enclave, with its recovery id: ranges and
            # low-S are checked, but not recomputed (the enclave is the trusted side here,
            # and a faulty signature would already have left it).
            signature = RecoverableSignature.from_bytes(signature_bytes)
        elif isinstance(signature_bytes, bytes):  # a device's output (HSM in the enclave)
            signature = device_signature(signature_bytes, digest, info)
        elif "approved" in result:
            signature = self.signer.sign_hash(info, digest)
        else:
            raise DependencyUnavailable("the enclave sent a malformed outcome")
        return Signed(info, assemble(signature))


def _same_calls(asked: Sequence[object], calls: Sequence[SigningCall]) -> bool:
    """Whether ``calls`` are the very objects ``asked`` holds, in the same order."""
    return len(asked) == len(calls) and all(map(operator.is_, asked, calls))


def _fitting(asked: Sequence[SigningCall | SigndError], call: SigningCall) -> Callable[[int], bool]:
    """Whether the request's call at a position is ``call`` (fills allowed)."""
    return lambda position: _fills_from(asked[position], call) is not None


def _fills_from(asked: SigningCall | SigndError, call: SigningCall) -> dict[str, Any] | None:
    """:func:`_fills_for` a call of the request, which may be one it failed to parse."""
    return None if isinstance(asked, SigndError) else _fills_for(asked, call)


def _fills_for(asked: SigningCall, call: SigningCall) -> dict[str, Any] | None:
    """The fields the host filled into ``call`` if it is the request's ``asked`` call with
    only :data:`~signd.gate.interpret.FILLABLE` fields the caller left out added; else
    ``None``."""
    if asked is call:  # the API took the request's calls as the gate read them
        return {}
    if asked.kind is not call.kind or asked.key != call.key:
        return None
    if asked.payload == call.payload:
        return {}
    if (
        call.kind is not SigningKind.ETH_TRANSACTION
        or not isinstance(asked.payload, dict)
        or not isinstance(call.payload, dict)
    ):
        return None
    fills = {
        name: value
        for name, value in call.payload.items()
        if name in FILLABLE and value is not None and asked.payload.get(name) is None
    }
    try:
        filled = apply_fills(asked.payload, fills)
    except SigndError:
        return None
    return fills if filled == call.payload else None


def _read(path: Any, *, missing_ok: bool = False) -> bytes:
    try:
        data: bytes = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return b""
        raise ConfigurationError(f"{path} is missing") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    return data


VERIFY_CHUNK: Final = 500
"""The most log lines per AUDIT_VERIFY message."""
VERIFY_CHUNK_BYTES: Final = 256 * 1024
"""The most bytes of log lines per AUDIT_VERIFY message past its first (a frame is 1 MiB)."""


@dataclass(frozen=True, slots=True)
class EnclaveVerification:
    """What the enclave found in an audit log: the first problem, if any."""

    records: int
    """Records checked (all of them when there is no problem)."""
    head_seq: int
    head_hash: bytes
    problem: dict[str, Any] | None
    policies: tuple[PolicyRun, ...] = ()
    """The configurations the records checked name, from which record on."""
    against_chain_head: bool = False
    """Whether the enclave seals with this key, so that a log ending before its chain head
    is reported (``truncated``); not so for an enclave of its own or one using another key."""


def _tail_chunks(
    paths: GatePaths, last: SealedAuditRecord | None, policy_data: bytes
) -> list[list[str]]:
    """The audit log's records over the policy's longest spend window (and a margin for the
    enclave's clock), up to ``last``, as GATE_CONFIGURE chunks: oldest first, so that the
    newest is popped first. Empty for an empty log."""
    if last is None:
        return []
    try:
        window = longest_window(Policy.from_bytes(policy_data))
    except ConfigurationError:
        window = 0  # the enclave refuses the file and says why
    since = time.time() - window - TAIL_CLOCK_MARGIN if window else math.inf
    tail = read_tail(paths.audit_log, since=since)
    ends = next((i for i, item in enumerate(tail) if item.hash == last.hash), len(tail) - 1)
    newest_first = [item.to_json() for item in reversed(tail[: ends + 1])]
    chunks = line_chunks(newest_first, MAX_TAIL_RECORDS, TAIL_CHUNK_BYTES)
    return [chunk[::-1] for chunk in reversed(chunks)]  # the newest chunk is the fullest


def line_chunks(lines: Sequence[str], max_lines: int, max_bytes: int) -> list[list[str]]:
    """``lines`` in order, cut into chunks (:func:`iter_line_chunks`)."""
    return list(iter_line_chunks(lines, max_lines, max_bytes))


def iter_line_chunks(lines: Iterable[str], max_lines: int, max_bytes: int) -> Iterator[list[str]]:
    """``lines`` in order, cut into chunks of at most ``max_lines`` lines and, beyond each
    chunk's first line, ``max_bytes`` characters (audit lines are ASCII), so that each chunk
    travels in one frame: a record listing many signatures is tens of kilobytes. One empty
    chunk when there are no lines. Lazy: a chunk is cut only when asked for."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and (len(chunk) >= max_lines or size + len(line) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    yield chunk


def verify_in_enclave(
    client: EnclaveClient, paths: GatePaths, lines: Sequence[bytes] | LogLines
) -> EnclaveVerification:
    """Verify audit log ``lines`` in the enclave, which holds the MAC key (the host has only
    its ciphertext, ``paths.sealed_audit_key_file``). Each AUDIT_VERIFY carries the key's
    ciphertext, which the enclave unwraps for verification only: the clients, policy and
    audit chain in force there stay as they are (a running service's enclave takes files from
    disk on a reload only). The lines go in chunks (:func:`iter_line_chunks`), with the state
    the enclave returns carried between them. Lines read from the log's file
    (:class:`~signd.audit.lines.LogLines`) are read as they are sent, a chunk at a time."""
    sealed_key = _read(paths.sealed_audit_key_file)
    if not sealed_key:
        raise ConfigurationError(f"{paths.sealed_audit_key_file} is empty: restore the key file")
    state = b""
    answer: dict[str, Any] = {}
    policies = PolicyRuns()
    # A line over the longest record is sent cut short (still too long, so reported as
    # unreadable at its place) rather than in a frame over the channel's limit.
    texts = (line[: MAX_LINE_SIZE + 1].decode("ascii", "replace") for line in lines)
    chunks = iter_line_chunks(texts, VERIFY_CHUNK, VERIFY_CHUNK_BYTES)
    chunk: list[str] | None = next(chunks)
    while chunk is not None:
        following = next(chunks, None)
        answer = client.request(
            MessageType.AUDIT_VERIFY,
            {"records": chunk, "state": state, "final": following is None, "audit_key": sealed_key},
            idempotent=True,
        )
        if not isinstance(answer.get("against_chain_head"), bool):
            raise IntegrityError(
                "the enclave's audit verification answer does not say whether it compared "
                "the log with its chain head (an enclave older than this host?)"
            )
        state = answer["state"]
        for run in _policy_runs(answer.get("policies", [])):
            policies.add(run.from_seq, run.policy_sha256, run.clients_sha256)
        if "problem" in answer:
            break
        chunk = following
    head = answer.get("head", {})
    return EnclaveVerification(
        int(answer.get("checked", 0)),
        int(head.get("seq", 0)),
        bytes(head.get("hash", b"")),
        answer.get("problem"),
        tuple(policies.runs),
        against_chain_head=answer["against_chain_head"],
    )


def _policy_runs(value: object) -> list[PolicyRun]:
    """The ``policies`` of an AUDIT_VERIFY answer."""
    if not isinstance(value, list):
        raise IntegrityError("the enclave's audit verification answer is malformed")
    runs = []
    for item in value:
        if not isinstance(item, dict):
            raise IntegrityError("the enclave's audit verification answer is malformed")
        from_seq = item.get("from_seq")
        policy, clients = item.get("policy_sha256"), item.get("clients_sha256")
        if (
            not isinstance(from_seq, int)
            or not (policy is None or isinstance(policy, str))
            or not (clients is None or isinstance(clients, str))
        ):
            raise IntegrityError("the enclave's audit verification answer is malformed")
        runs.append(PolicyRun(from_seq, policy, clients))
    return runs
