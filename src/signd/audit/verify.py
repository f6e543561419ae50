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
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

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
class VerificationReport:
    records: int
    problems: tuple[ChainProblem, ...]
    head: ChainHead
    """The head of the verified chain: the highest-numbered record that verifies."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds_at(self, position: int) -> set[ProblemKind]:
        return {p.kind for p in self.problems if p.position == position}


def verify_chain(
    records: Iterable[SealedAuditRecord],
    mac_key: Secret,
    *,
    start: ChainHead | None = GENESIS,
    expected_head: ChainHead | None = None,
) -> VerificationReport:
    """Verify a chain of sealed records with ``mac_key``.

    ``start`` is the head the log continues from: genesis for a complete log, the last
    head of the previous file for a rotated one, or ``None`` to take the first record's
    word for it (which cannot detect removals at the very start).
    """
    items = list(records)
    checks = [seal_is_valid(item, mac_key) for item in items]
    sound = [mac_ok and hash_ok for mac_ok, hash_ok in checks]
    if items and not any(mac_ok for mac_ok, _ in checks):
        problem = ChainProblem(
            0,
            items[0].record.seq,
            ProblemKind.BAD_MAC,
            "no record's MAC verifies: wrong MAC key, or the whole log is forged",
        )
        return VerificationReport(len(items), (problem,), start or GENESIS)

    hash_of: dict[int, bytes] = {}
    for item, ok in zip(items, sound, strict=True):
        if ok:
            hash_of.setdefault(item.record.seq, item.hash)
    ahead = Counter(item.record.seq for item, ok in zip(items, sound, strict=True) if ok)
    sound_seqs = set(ahead)
    if start is not None:
        hash_of.setdefault(start.seq, start.hash)
        expected = start.seq + 1
    else:
        first = next((item.record.seq for item, ok in zip(items, sound, strict=True) if ok), 1)
        expected = first

    problems: list[ChainProblem] = []
    seen: set[int] = set()

    def report(position: int, seq: int | None, kind: ProblemKind, detail: str) -> None:
        problems.append(ChainProblem(position, seq, kind, detail))

    for position, (item, (mac_ok, _)) in enumerate(zip(items, checks, strict=True)):
        seq = item.record.seq
        if not sound[position]:
            if expected in sound_seqs:
                report(position, seq, ProblemKind.INSERTED, "a record that does not verify")
                continue
            why = "MAC does not verify" if not mac_ok else "stored hash is not the record's"
            report(position, seq, ProblemKind.ALTERED, f"record {expected}: {why}")
            expected += 1
            continue
        ahead[seq] -= 1
        if seq in seen:
            report(position, seq, ProblemKind.INSERTED, f"record {seq} appears again")
            continue
        if seq > expected:
            missing = range(expected, seq)
            later = [s for s in missing if ahead[s] > 0]
            gone = [s for s in missing if ahead[s] <= 0 and s not in seen]
            if later:
                report(position, seq, ProblemKind.REORDERED, f"comes before records {_span(later)}")
            if gone:
                report(position, seq, ProblemKind.REMOVED, f"records {_span(gone)} are missing")
        elif seq < expected:
            report(position, seq, ProblemKind.REORDERED, f"comes after record {expected - 1}")
        predecessor = hash_of.get(seq - 1)
        if predecessor is not None and item.prev_hash != predecessor:
            report(
                position,
                seq,
                ProblemKind.BROKEN_LINK,
                f"prev_hash is not the hash of record {seq - 1}",
            )
        seen.add(seq)
        expected = max(expected, seq + 1)

    head = ChainHead(max(seen), hash_of[max(seen)]) if seen else (start or GENESIS)
    if expected_head is not None and head != expected_head:
        report(
            len(items),
            None,
            ProblemKind.TRUNCATED,
            f"the log ends at record {head.seq}, not at record {expected_head.seq}",
        )
    return VerificationReport(len(items), tuple(problems), head)


def _span(seqs: list[int]) -> str:
    """``5``, ``5-7`` or ``5, 9, 12`` for a list of sequence numbers."""
    if len(seqs) == 1:
        return str(seqs[0])
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return f"{seqs[0]}-{seqs[-1]}"
    return ", ".join(str(s) for s in seqs)
