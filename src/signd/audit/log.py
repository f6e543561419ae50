"""Where the host keeps sealed audit records: an append-only, hash-chained log.

The host cannot forge records (it has no MAC key); it only stores them in order.
:class:`AuditLog` is the interface; :class:`FileAuditLog` keeps one JSON object per line and
fsyncs every append. A database-backed log implements the same four methods.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, Protocol

from signd.audit.records import GENESIS, ChainHead, SealedAuditRecord
from signd.errors import IntegrityError

_TAIL_CHUNK: Final = 64 * 1024


class AuditLog(Protocol):
    """An append-only store of sealed records, in chain order."""

    def append(self, sealed: SealedAuditRecord) -> None:
        """Store ``sealed`` durably; refuse one that does not extend the chain."""
        ...

    def append_many(self, sealed: Sequence[SealedAuditRecord]) -> None:
        """Store consecutive records with one durable write; all or none are accepted."""
        ...

    def last_hash(self) -> bytes:
        """The last record's hash (32 zero bytes for an empty log)."""
        ...

    def last_record(self) -> SealedAuditRecord | None:
        """The last record, to seed the enclave's :class:`AuditSigner` at start."""
        ...

    def records(self) -> Iterator[SealedAuditRecord]:
        """Every record, oldest first."""
        ...


class FileAuditLog:
    """JSON lines, appended and fsynced one record at a time.

    Opening reads only the last line (from the end of the file), so it is quick however
    long the log is. A final line without its newline (a write torn by a crash) is an
    :class:`~signd.errors.IntegrityError`: an operator must look at it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._last = _read_last_record(self.path)
        existed = self.path.exists()
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for appends
        if not existed:
            _fsync_directory(self.path.parent)

    def __repr__(self) -> str:
        return f"FileAuditLog(path={str(self.path)!r}, seq={self.head.seq})"

    def __enter__(self) -> FileAuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def head(self) -> ChainHead:
        return GENESIS if self._last is None else self._last.head

    def last_hash(self) -> bytes:
        return self.head.hash

    def last_record(self) -> SealedAuditRecord | None:
        return self._last

    def append(self, sealed: SealedAuditRecord) -> None:
        self.append_many([sealed])

    def append_many(self, sealed: Sequence[SealedAuditRecord]) -> None:
        if not sealed:
            return
        with self._lock:
            head = self.head
            for record in sealed:
                if record.prev_hash != head.hash or record.record.seq != head.seq + 1:
                    raise IntegrityError(
                        f"audit record {record.record.seq} does not extend the log "
                        f"(last record is {head.seq})"
                    )
                head = record.head
            self._file.write(b"".join((r.to_json() + "\n").encode("ascii") for r in sealed))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._last = sealed[-1]

    def records(self) -> Iterator[SealedAuditRecord]:
        with open(self.path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    yield SealedAuditRecord.from_json(line)
                except IntegrityError as exc:
                    raise IntegrityError(f"audit log line {number}: {exc.message}") from None


def _read_last_record(path: Path) -> SealedAuditRecord | None:
    """The record on the file's last line, read backwards from the end."""
    try:
        with open(path, "rb") as file:
            end = file.seek(0, os.SEEK_END)
            if end == 0:
                return None
            tail = b""
            position = end
            while position > 0 and tail.count(b"\n") < 2:
                step = min(_TAIL_CHUNK, position)
                position -= step
                file.seek(position)
                tail = file.read(step) + tail
    except FileNotFoundError:
        return None
    if not tail.endswith(b"\n"):
        raise IntegrityError(f"audit log {path} ends in a torn line (no final newline)")
    last_line = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        return SealedAuditRecord.from_json(last_line)
    except IntegrityError as exc:
        raise IntegrityError(f"audit log {path}, last line: {exc.message}") from None


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
