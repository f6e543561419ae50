"""Checking an audit chain: what was altered, removed, reordered or inserted, and where.

:func:`verify_chain` reads the records in log order and reports each problem with its
position (0-based, in the order given) and kind:

- ``altered`` — a record that does not verify (MAC or stored hash) in the place of a number
  no verified record has: its content, digests or sequence number were changed;
- ``inserted`` — a record that does not verify where no number is missing, or a verified
  record repeated;
- ``removed`` — numbers are missing before this record and appear nowhere later;
- ``reordered`` — this record comes before a lower number, or after a higher one;
- ``broken_link`` — a verified record whose ``prev_hash`` is not its predecessor's hash
  (a record from another chain under the same key, such as a fork after a rollback);
- ``bad_mac`` — no record verifies at all: the wrong MAC key, or a wholly forged log;
- ``truncated`` — the log ends before the head the enclave last reported.

Removing records from the end cannot be seen from the log alone; pass ``expected_head``
(the enclave signer's :attr:`~signd.audit.AuditSigner.head`) to catch it.

The report also says which configurations the verified records name, and from which record
on (:class:`PolicyRun`): a reload of the policy or clients file shows as a new run.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from signd.audit.records import GENESIS, ChainHead, SealedAuditRecord, seal_is_valid
from signd.crypto.secret import Secret


class ProblemKind(enum.StrEnum):
    ALTERED = "altered"
    INSERTED = "inserted"
    REMOVED = "removed"
    REORDERED = "reordered"
    BROKEN_LINK = "broken_link"
    BAD_MAC = "bad_mac"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True)
class ChainProblem:
    position: int
    """0-based index of the record in the log (the record count for ``truncated``)."""
    seq: int | None
    """The sequence number the record claims (``None`` where there is no record)."""
    kind: ProblemKind
    detail: str


@dataclass(frozen=True, slots=True)
class PolicyRun:
    """Records under one configuration: from record ``from_seq`` on, until the next run,
    the records name the policy ``policy_sha256`` and the clients file ``clients_sha256``
    (``None``: records sealed before records named them)."""

    from_seq: int
    policy_sha256: str | None
    clients_sha256: str | None

    def to_dict(self) -> dict[str, int | str | None]:
        return {
            "from_seq": self.from_seq,
            "policy_sha256": self.policy_sha256,
            "clients_sha256": self.clients_sha256,
        }


class PolicyRuns:
    """The :class:`PolicyRun` s of records given in log order: a new run starts at a record
    that names another configuration than the run before it. A record that names none (of
    no decision, as ``audit:resume``) stays in the run it is in; records that name none
    before the first that does (an older log) make a run of their own. As many runs as
    reloads, whatever the length of the log."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[PolicyRun] = []

    def add(self, seq: int, policy_sha256: str | None, clients_sha256: str | None) -> None:
        """Record ``seq``, which names ``policy_sha256`` and ``clients_sha256``."""
        if self.runs:
            last = self.runs[-1]
            if policy_sha256 is None and clients_sha256 is None:
                return
            if last.policy_sha256 == policy_sha256 and last.clients_sha256 == clients_sha256:
                return
        self.runs.append(PolicyRun(seq, policy_sha256, clients_sha256))


@dataclass(frozen=True, slots=True)
class VerificationReport:
    records: int
    problems: tuple[ChainProblem, ...]
    head: ChainHead
    """The head of the verified chain: the highest-numbered record that verifies."""
    policies: tuple[PolicyRun, ...] = ()
    """The configurations the records that verify name, in log order."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds_at(self, position: int) -> set[ProblemKind]:
        return {p.kind for p in self.problems if p.position == position}


def verify_chain(
    records: Iterable[SealedAuditRecord] | Callable[[], Iterable[SealedAuditRecord]],
    mac_key: Secret,
    *,
    start: ChainHead | None = GENESIS,
    expected_head: ChainHead | None = None,
) -> VerificationReport:
    """Verify a chain of sealed records with ``mac_key``.

    ``records`` may instead be a function that reads the same records afresh each time it is
    called (from a file, say): they are then read twice, never held together, and the memory
    used grows with the problems found, not with the log.

    ``start`` is the head the log continues from: genesis for a complete log, the last
    head of the previous file for a rotated one, or ``None`` to take the first record's
    word for it (which cannot detect removals at the very start).
    """
    if callable(records):
        read = records
    else:
        items = records if isinstance(records, Collection) else list(records)

        def read() -> Iterable[SealedAuditRecord]:
            return items

    census = _Census.of(read(), mac_key)
    if census.records and not census.any_mac_ok:
        problem = ChainProblem(
            0,
            census.first_seq,
            ProblemKind.BAD_MAC,
            "no record's MAC verifies: wrong MAC key, or the whole log is forged",
        )
        return VerificationReport(census.records, (problem,), start or GENESIS)
    problems = _chain_problems(read(), census, start)
    head = census.head or start or GENESIS
    if expected_head is not None and head != expected_head:
        problems.append(
            ChainProblem(
                census.records,
                None,
                ProblemKind.TRUNCATED,
                f"the log ends at record {head.seq}, not at record {expected_head.seq}",
            )
        )
    policies = tuple(census.policies.runs)
    return VerificationReport(census.records, tuple(problems), head, policies)


class _SeqSet:
    """A set of sequence numbers kept as sorted runs of consecutive numbers: a chain's
    numbers are one run, so its size is that of the gaps and disorder, not of the chain."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        """Each run is ``range(start, end)``, runs in order, none touching another."""

    def __contains__(self, seq: int) -> bool:
        run = bisect.bisect_right(self._starts, seq) - 1
        return run >= 0 and seq < self._ends[run]

    def add(self, seq: int) -> None:
        starts, ends = self._starts, self._ends
        if ends and ends[-1] == seq:  # the usual case: the next number of the last run
            ends[-1] += 1
            return
        run = bisect.bisect_right(starts, seq) - 1
        if run >= 0 and seq < ends[run]:
            return
        joins_left = run >= 0 and ends[run] == seq
        joins_right = run + 1 < len(starts) and starts[run + 1] == seq + 1
        if joins_left and joins_right:
            ends[run] = ends[run + 1]
            del starts[run + 1], ends[run + 1]
        elif joins_left:
            ends[run] = seq + 1
        elif joins_right:
            starts[run + 1] = seq
        else:
            starts.insert(run + 1, seq)
            ends.insert(run + 1, seq + 1)

    def split(self, low: int, high: int) -> tuple[list[range], list[range]]:
        """``range(low, high)`` as the runs of its numbers in the set and of those not."""
        present: list[range] = []
        absent: list[range] = []
        at = low
        run = max(bisect.bisect_right(self._starts, low) - 1, 0)
        while at < high and run < len(self._starts):
            start, end = self._starts[run], self._ends[run]
            if start >= high:
                break
            if at < start:
                absent.append(range(at, start))
                at = start
            if at < end:
                present.append(range(at, min(end, high)))
                at = min(end, high)
            run += 1
        if at < high:
            absent.append(range(at, high))
        return present, absent


@dataclass(slots=True)
class _Census:
    """What the second reading of a chain needs to know of the whole of it (the first
    reading): kept small, since the numbers of the records that verify are runs."""

    records: int = 0
    first_seq: int | None = None
    """The number the first record claims."""
    any_mac_ok: bool = False
    sound: _SeqSet = field(default_factory=_SeqSet)
    """The numbers of the records that verify (MAC and stored hash)."""
    first_sound: int | None = None
    head: ChainHead | None = None
    """The highest-numbered record that verifies (its first copy)."""
    unsound: dict[int, bool] = field(default_factory=dict)
    """The position of each record that does not verify, and whether its MAC does."""
    linked: set[int] = field(default_factory=set)
    """The numbers whose first verified record's hash a later reading has to keep: the
    predecessors of records that do not directly follow their predecessor's first copy."""
    policies: PolicyRuns = field(default_factory=PolicyRuns)
    """The configurations the first copies of the records that verify name."""

    @classmethod
    def of(cls, items: Iterable[SealedAuditRecord], mac_key: Secret) -> _Census:
        census = cls()
        previous: tuple[int, bool] | None = None
        """The number of the last record that verified, and whether it was its first copy."""
        for position, item in enumerate(items):
            seq = item.record.seq
            if census.first_seq is None:
                census.first_seq = seq
            census.records += 1
            mac_ok, hash_ok = seal_is_valid(item, mac_key)
            census.any_mac_ok |= mac_ok
            if not (mac_ok and hash_ok):
                census.unsound[position] = mac_ok
                continue
            first = seq not in census.sound
            if first:
                if previous != (seq - 1, True):
                    census.linked.add(seq - 1)
                census.sound.add(seq)
                if census.first_sound is None:
                    census.first_sound = seq
                if census.head is None or seq > census.head.seq:
                    census.head = item.head
                record = item.record
                census.policies.add(seq, record.policy_sha256, record.clients_sha256)
            previous = (seq, first)
        return census


def _chain_problems(
    items: Iterable[SealedAuditRecord], census: _Census, start: ChainHead | None
) -> list[ChainProblem]:
    """The problems of the chain, read a second time, in log order."""
    sound = census.sound
    if start is not None:
        expected = start.seq + 1
    else:
        expected = 1 if census.first_sound is None else census.first_sound
    problems: list[ChainProblem] = []
    seen = _SeqSet()
    linked_hash: dict[int, bytes] = {}
    waiting: dict[int, list[tuple[int, int, bytes]]] = {}
    """Records whose predecessor's first copy comes later: (position, seq, prev_hash)."""
    previous: tuple[int, bytes, bool] | None = None
    """The last record that verified: its number, hash and whether it was its first copy."""

    def report(position: int, seq: int | None, kind: ProblemKind, detail: str) -> None:
        problems.append(ChainProblem(position, seq, kind, detail))

    def broken_link(position: int, seq: int) -> None:
        report(
            position, seq, ProblemKind.BROKEN_LINK, f"prev_hash is not the hash of record {seq - 1}"
        )

    for position, item in enumerate(items):
        seq = item.record.seq
        mac_ok = census.unsound.get(position)
        if mac_ok is not None:
            if expected in sound:
                report(position, seq, ProblemKind.INSERTED, "a record that does not verify")
                continue
            why = "MAC does not verify" if not mac_ok else "stored hash is not the record's"
            report(position, seq, ProblemKind.ALTERED, f"record {expected}: {why}")
            expected += 1
            continue
        if seq in seen:
            report(position, seq, ProblemKind.INSERTED, f"record {seq} appears again")
            previous = (seq, item.hash, False)
            continue
        if seq > expected:
            # Every number seen is below ``expected``: a missing one is either later or gone.
            later, gone = sound.split(expected, seq)
            if later:
                report(position, seq, ProblemKind.REORDERED, f"comes before records {_span(later)}")
            if gone:
                report(position, seq, ProblemKind.REMOVED, f"records {_span(gone)} are missing")
        elif seq < expected:
            report(position, seq, ProblemKind.REORDERED, f"comes after record {expected - 1}")
        before = seq - 1
        predecessor: bytes | None = None
        if previous is not None and previous[0] == before and previous[2]:
            predecessor = previous[1]
        elif before in sound:  # then ``before`` is in census.linked
            predecessor = linked_hash.get(before)
            if predecessor is None:
                waiting.setdefault(before, []).append((position, seq, item.prev_hash))
        elif start is not None and before == start.seq:
            predecessor = start.hash
        if predecessor is not None and item.prev_hash != predecessor:
            broken_link(position, seq)
        if seq in census.linked:
            linked_hash[seq] = item.hash
            for at, follower, prev_hash in waiting.pop(seq, ()):
                if prev_hash != item.hash:
                    broken_link(at, follower)
        seen.add(seq)
        expected = max(expected, seq + 1)
        previous = (seq, item.hash, True)
    problems.sort(key=lambda problem: problem.position)  # links found late go in their place
    return problems


def _span(runs: list[range]) -> str:
    """``5``, ``5-7`` or ``5, 9, 12`` for runs of sequence numbers (none touching)."""
    if len(runs) == 1 and len(runs[0]) == 1:
        return str(runs[0][0])
    if len(runs) == 1:
        return f"{runs[0][0]}-{runs[0][-1]}"
    return ", ".join(str(seq) for run in runs for seq in run)
