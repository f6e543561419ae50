"""The audit trail the gate writes: records sealed by the :class:`~signd.audit.AuditSigner`
and appended to the :class:`~signd.audit.AuditLog`, which writes concurrent callers'
records together and in ``seq`` order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from signd.audit import AuditLog, AuditSigner, FileAuditLog
from signd.audit.log import store_records
from signd.audit.records import Spend
from signd.auth.clients import ClientsRegistry
from signd.crypto.secret import Secret
from signd.errors import SigndError
from signd.policy import Operation, Policy

log = logging.getLogger("signd.gate.audit")

AuditEntry = dict[str, Any]
"""The keyword arguments of one :meth:`~signd.audit.AuditSigner.seal`."""

MAX_REASON = 500

GROUPED_OPERATIONS: Final = frozenset({str(Operation.SIGN_HASH), str(Operation.SIGN_MESSAGE)})
"""Operations whose policy intent is the client and the key alone (nothing of the payload
reaches the policy): every such signature a request asks of one key is the same decision."""
_PENDING: Final = "pending:"
"""How a result that :meth:`DecisionLog.signed_later` holds a place for starts (never hex)."""
MAX_GROUPED_RESULTS: Final = 256
"""The most signatures one record lists (its log line then stays near 18 KB, well within the
enclave's 64 KiB per line of audit tail); a larger group goes on in a new record."""


@dataclass(frozen=True, slots=True)
class InForce:
    """The configuration one gate call authenticates and decides under, taken once as it
    begins: the clients and the policy of one reload (the caller is authenticated against
    those clients, every policy decision of the call is made with that policy, however soon
    a reload replaces them). Every record of the call names both files; their digests were
    computed when the files were loaded, so naming them costs nothing."""

    policy: Policy
    clients: ClientsRegistry

    @property
    def clients_sha256(self) -> str:
        return self.clients.sha256

    def names(self) -> AuditEntry:
        """The audit entry fields that name this configuration."""
        return {"policy_sha256": self.policy.sha256, "clients_sha256": self.clients_sha256}


class DecisionLog:
    """The audit entries of one gate call, in the order its decisions were made.

    An allowed signature joins the entry of an earlier one of the same request when both
    are one decision: an operation in :data:`GROUPED_OPERATIONS`, the same key, rule and reason,
    and no spend. That entry then lists each result's SHA-256 in ``results_sha256`` (in
    request order, ``result_sha256`` null), so a batch of a thousand hashes over a few keys
    seals a few records rather than a thousand, and still names every signature it made
    (at most :data:`MAX_GROUPED_RESULTS` per record).
    """

    __slots__ = ("_groups", "_pending", "_tokens", "entries")

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []
        self._groups: dict[tuple[str, str | None, str | None, str], AuditEntry] = {}
        self._pending: dict[int, AuditEntry] = {}
        """The entries holding tokens of :meth:`signed_later`, by identity."""
        self._tokens = 0

    def next_request(self) -> None:
        """The entries from here on are another request's: a signature never joins an entry
        of an earlier request (a gate call may carry several, each with its own records)."""
        self._groups.clear()

    def append(self, entry: AuditEntry) -> None:
        """A decision of its own (a refusal, a key, a transaction)."""
        self.entries.append(entry)

    def signed(
        self,
        base: AuditEntry,
        *,
        reason: str,
        rule: str | None,
        result_sha256: str | None,
        spend: Spend | None,
    ) -> AuditEntry:
        """An allowed signature, its own entry or one more result of an earlier one (the
        entry it went to is returned)."""
        group = None
        if spend is None and result_sha256 is not None and base["operation"] in GROUPED_OPERATIONS:
            group = (base["operation"], base.get("key_id"), rule, reason)
            entry = self._groups.get(group)
            if entry is not None:
                results: list[str] | None = entry.get("results_sha256")
                if results is None:
                    entry["results_sha256"] = [entry["result_sha256"], result_sha256]
                    entry["result_sha256"] = None
                    return entry
                if len(results) < MAX_GROUPED_RESULTS:
                    results.append(result_sha256)
                    return entry
        entry = base | {
            "decision": "allowed",
            "reason": reason,
            "rule": rule,
            "result_sha256": result_sha256,
            "spend": spend,
        }
        self.entries.append(entry)
        if group is not None:
            self._groups[group] = entry
        return entry

    def signed_later(self, base: AuditEntry, *, reason: str, rule: str | None) -> str:
        """:meth:`signed` for a signature not made yet (and no spend): its place in the log
        is taken now, in decision order, under a token that :meth:`settle` replaces."""
        token = f"{_PENDING}{self._tokens}"
        self._tokens += 1
        entry = self.signed(base, reason=reason, rule=rule, result_sha256=token, spend=None)
        self._pending[id(entry)] = entry
        return token

    def settle(self, outcomes: Mapping[str, str | SigndError]) -> None:
        """Give each pending signature its result's SHA-256 (``outcomes`` by token), or the
        error that stopped it: that signature becomes a refusal of its own, in its entry's
        place when the entry is left with no result, else after the others."""
        failed: list[AuditEntry] = []
        for entry in self._pending.values():
            results: list[str] | None = entry.get("results_sha256")
            settled: list[str] = []
            for token in [entry["result_sha256"]] if results is None else results:
                outcome = outcomes[token] if token.startswith(_PENDING) else token
                if isinstance(outcome, SigndError):
                    failed.append(_refusal(entry, outcome))
                else:
                    settled.append(outcome)
            if not settled:
                place = next(i for i, each in enumerate(self.entries) if each is entry)
                self.entries[place] = failed.pop()
            elif results is None or len(settled) == 1:
                entry.pop("results_sha256", None)
                entry["result_sha256"] = settled[0]
            else:
                entry["results_sha256"] = settled
        self._pending.clear()
        self.entries.extend(failed)


COUNTED_FOR: Final = 10.0
"""Seconds authentication refusals past :class:`RefusalRecords`' limit are counted before
their count is sealed (with the next refusal after that)."""


class RefusalRecords:
    """Which authentication refusals are sealed in a record each: at most ``burst`` at once
    and ``rate`` a second on average, whoever sends them (the host's limits per address come
    first, but cannot hold back a sender with many addresses). Past that, refusals are
    counted, not recorded one by one, and the count is sealed as one refusal record of its
    own (no ``request_sha256``; the reason says how many, over how long), with the first
    refusal :data:`COUNTED_FOR` seconds or more after counting began. ``rate`` 0: every
    refusal is recorded. ``clock`` gives seconds; thread-safe.

    This bounds how fast callers who are not clients can grow the audit log (a record is
    about 760 bytes), however many addresses they come from; a request that authenticates
    and every decision about it are recorded as before, within the limit or not.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.rate, self.burst = rate, burst
        self._tokens, self._counted = float(burst), clock()
        self._unrecorded = 0
        self._since = 0.0
        """When the refusals now counted began to be counted."""

    def configure(self, rate: float, burst: int) -> None:
        """Another limit from now on (a refusal's count so far is kept)."""
        with self._lock:
            self.rate, self.burst = rate, burst
            self._tokens = min(self._tokens, float(burst))

    def entries(self, refusal: AuditEntry) -> list[AuditEntry]:
        """What to seal for ``refusal``: itself while within the limit, else nothing; first,
        when it is due, the record of the refusals counted meanwhile."""
        with self._lock:
            now = self._clock()
            recorded = self.rate <= 0 or self._take(now)
            sealed: list[AuditEntry] = []
            if not recorded:
                if not self._unrecorded:
                    self._since = now
                self._unrecorded += 1
            if self._unrecorded and (self.rate <= 0 or now - self._since >= COUNTED_FOR):
                sealed.append(self._count(refusal, now))
            if recorded:
                sealed.append(refusal)
            return sealed

    def _take(self, now: float) -> bool:
        self._tokens = min(float(self.burst), self._tokens + (now - self._counted) * self.rate)
        self._counted = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _count(self, refusal: AuditEntry, now: float) -> AuditEntry:
        count, seconds = self._unrecorded, max(0.0, now - self._since)
        self._unrecorded = 0
        log.warning(
            "%d authentication refusals in %.0f s were past the limit of %g records a second:"
            " sealed as one record",
            count,
            seconds,
            self.rate,
        )
        entry = {name: value for name, value in refusal.items() if name != "request_sha256"}
        entry["reason"] = (
            f"{count} more authentication refusals in the last {seconds:.0f} s, not recorded"
            f" one by one (past the limit of {self.rate:g} records a second)"
        )
        return entry


class AuditTrail:
    """Seals and stores records; nothing the gate returns leaves without its record.

    :meth:`write` seals a group of records under a lock (so they are numbered in the order
    the decisions were made) and hands them to the store outside it, so that the store can
    write the records of concurrent callers together (group commit). When the store refuses
    or fails, the error propagates (the caller withholds its results) and the chain is
    reseeded from the log's last durable record before the next record is sealed: once the
    writes in progress have all finished, so that the log's end is final.
    """

    def __init__(self, mac_key: Secret, node: str, store: AuditLog) -> None:
        self._mac_key = mac_key
        self._node = node
        self.store = store
        self._state = threading.Condition(threading.Lock())
        self._signer = AuditSigner(mac_key, node, last=store.last_record())
        self._writing = 0
        """Writes between sealing and their store's answer."""
        self._reseed = False
        """A write failed: reseed the signer from the log once no write is in progress."""

    def __repr__(self) -> str:
        return f"AuditTrail(signer={self._signer!r})"

    @property
    def signer(self) -> AuditSigner:
        return self._signer

    def close(self) -> None:
        if isinstance(self.store, FileAuditLog):
            self.store.close()

    def check_health(self) -> None:
        """Whether records can be stored (else :class:`~signd.errors.DependencyUnavailable`)."""
        self.store.check_health()

    def write(self, entries: Sequence[AuditEntry], *, wait: bool = False) -> None:
        """Seal ``entries`` and return once their records are durable, or raise; inside
        :func:`~signd.audit.log.deferring_appends` and unless ``wait``, once they are
        submitted."""
        if not entries:
            return
        with self._state:
            while self._reseed and self._writing:
                self._state.wait()
            if self._reseed:
                self._signer = AuditSigner(self._mac_key, self._node, last=self.store.last_record())
                self._reseed = False
            sealed = [
                self._signer.seal(**{**entry, "reason": str(entry["reason"])[:MAX_REASON]})
                for entry in entries
            ]
            self._writing += 1
        store_records(self.store, sealed, failed=self._failed, finished=self._finished, wait=wait)

    def _failed(self, exc: BaseException) -> None:
        why = _why(exc) if isinstance(exc, Exception) else type(exc).__name__
        log.error("audit log append failed; the results are withheld: %s", why)
        with self._state:
            self._reseed = True

    def _finished(self) -> None:
        with self._state:
            self._writing -= 1
            if not self._writing:
                self._state.notify_all()


def _refusal(entry: AuditEntry, error: SigndError) -> AuditEntry:
    """The refusal, by ``error``, of one signature ``entry`` (or its group) allowed."""
    refused = {name: value for name, value in entry.items() if name != "results_sha256"}
    return refused | {"decision": "refused", "reason": error.message, "result_sha256": None}


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, SigndError) else type(exc).__name__
