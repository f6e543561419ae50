"""The end of an audit log, read back to rebuild the policy's spend windows after a restart.

A window ``W`` seconds long needs every spend sealed since ``now - W``. The host reads the
log backwards from its end (:func:`read_tail`) until it reaches a record stamped at or before
that horizon, or the log's first record: that *boundary* record proves nothing after it was
left out. Whoever holds the MAC key checks the tail (:func:`check_tail`): every record's MAC,
each ``prev_hash`` the hash of the record before, the last one the chain head it trusts, and
(:func:`reaches`) that the first record is the boundary. Then :func:`spends` are replayed
into :class:`~signd.policy.PolicyEngine`.

A record's time is when it was sealed, just after its spend was committed, and is kept to
the millisecond; a spend is replayed at the end of its record's millisecond, so it leaves
the window no sooner than it did before the restart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from signd.audit.records import (
    GENESIS_HASH,
    SealedAuditRecord,
    Spend,
    seal_is_valid,
)
from signd.crypto.secret import Secret
from signd.errors import IntegrityError

_READ_CHUNK: Final = 64 * 1024
_MILLISECOND: Final = 0.001


def read_tail(path: str | Path, *, since: float) -> list[SealedAuditRecord]:
    """The log's records from the last one stamped at or before ``since`` (or its first
    record) to its end, oldest first; empty for a missing or empty log. Read backwards from
    the end, so the cost is the tail's size, not the log's."""
    found: list[SealedAuditRecord] = []
    try:
        with open(path, "rb") as file:
            position = file.seek(0, os.SEEK_END)
            if position == 0:
                return []
            file.seek(position - 1)
            if file.read(1) != b"\n":
                raise IntegrityError(f"audit log {path} ends in a torn line (no final newline)")
            pending = b""
            while position > 0:
                step = min(_READ_CHUNK, position)
                position -= step
                file.seek(position)
                pending = file.read(step) + pending
                lines = pending.split(b"\n")
                pending = lines[0] if position > 0 else b""
                complete = lines[1:] if position > 0 else lines
                for line in reversed(complete):
                    if not line:
                        continue
                    record = _parse(path, line)
                    found.append(record)
                    if record.record.timestamp <= since:
                        return found[::-1]
    except FileNotFoundError:
        return []
    return found[::-1]


def check_tail(tail: Sequence[SealedAuditRecord], mac_key: Secret, *, ends_at: bytes) -> None:
    """Raise :class:`~signd.errors.IntegrityError` unless every record of ``tail`` verifies,
    each links to the one before, and the last one's hash is ``ends_at``."""
    if not tail:
        raise IntegrityError("the audit tail is empty")
    for before, record in zip([None, *tail], tail, strict=False):
        seq = record.record.seq
        if seal_is_valid(record, mac_key) != (True, True):
            raise IntegrityError(f"audit tail record {seq} does not verify")
        if before is not None and (record.prev_hash != before.hash or seq != before.record.seq + 1):
            raise IntegrityError(f"audit tail record {seq} does not follow record {seq - 1}")
    if tail[-1].hash != ends_at:
        raise IntegrityError("the audit tail does not end at the expected record")


def reaches(first: SealedAuditRecord, since: float) -> bool:
    """Whether a checked tail starting at ``first`` holds every record after ``since``:
    ``first`` is the log's first record, or was sealed at or before ``since``."""
    is_genesis = first.record.seq == 1 and first.prev_hash == GENESIS_HASH
    return is_genesis or first.record.timestamp <= since


def spends(tail: Sequence[SealedAuditRecord]) -> list[tuple[float, Spend]]:
    """The spends the tail's allowed records carry, each with the time to replay it at."""
    return [
        (item.record.timestamp + _MILLISECOND, item.record.spend)
        for item in tail
        if item.record.spend is not None and item.record.decision == "allowed"
    ]


def _parse(path: str | Path, line: bytes) -> SealedAuditRecord:
    try:
        return SealedAuditRecord.from_json(line)
    except IntegrityError as exc:
        raise IntegrityError(f"audit log {path}: {exc.message}") from None
