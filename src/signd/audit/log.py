"""Where the host keeps sealed audit records: an append-only, hash-chained log.

The host cannot forge records (it has no MAC key); it only stores them in order.
:class:`AuditLog` is the interface; :class:`FileAuditLog` keeps one JSON object per line.
A database-backed log implements the same five methods.

Appends are group-committed: the records of every caller waiting at a given moment go out
in one write and one fsync, and each caller returns only once its own records are durable.
Records may be sealed elsewhere (the enclave) and arrive from several threads out of order:
a caller whose records come before their predecessors waits for them, for a bounded time.

:meth:`FileAuditLog.submit` is the same append without a waiting thread: it returns a
:class:`Submission` at once, and the log's writer thread tells its listeners once the records
are durable (or why they are not). The service's event loop appends this way, so that a
request waiting for its records costs no thread.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from signd import files
from signd.audit.records import GENESIS, ChainHead, SealedAuditRecord
from signd.errors import DependencyUnavailable, IntegrityError, SigndError

log = logging.getLogger(__name__)

_TAIL_CHUNK: Final = 64 * 1024
DEFAULT_COMMIT_INTERVAL: Final = 0.002
"""Seconds the writer thread of submissions lets pass between the starts of two groups, so
that under load each fsync carries the records of many requests (an append that finds the
log idle is written at once)."""
DEFAULT_ORDER_TIMEOUT: Final = 5.0
"""Seconds a caller's records wait for their predecessors before the caller is refused."""
MAX_REFUSED_HASHES: Final = 65536
"""Hashes of refused records remembered, so that their successors are refused at once."""


class AuditOrderError(DependencyUnavailable):
    """Records that cannot extend the log as it stands: one before them never arrived (an
    answer lost between the enclave and the host, when a request timed out) or was refused,
    or they come from a chain the log no longer follows. Nothing of theirs is released; the
    enclave's gate resumes its chain from the log's last record, so a retry is written. A
    503, like the fault behind it, rather than a sign of tampering."""


class AuditLog(Protocol):
    """An append-only store of sealed records, in chain order. Thread-safe."""

    def append(self, sealed: SealedAuditRecord) -> None:
        """Store ``sealed`` durably; refuse one that does not extend the chain."""
        ...

    def append_many(self, sealed: Sequence[SealedAuditRecord]) -> None:
        """Store consecutive records durably, all or none; return once they are on disk.

        Callers on several threads may hand in their records out of order: a caller waits
        for the records before its own, and is refused if they do not come in time.
        """
        ...

    def last_hash(self) -> bytes:
        """The last durable record's hash (32 zero bytes for an empty log)."""
        ...

    def last_record(self) -> SealedAuditRecord | None:
        """The last durable record, to seed the enclave's :class:`AuditSigner`."""
        ...

    def records(self) -> Iterator[SealedAuditRecord]:
        """Every record, oldest first."""
        ...

    def check_health(self) -> None:
        """Raise :class:`~signd.errors.DependencyUnavailable` while no record can be stored."""
        ...


@dataclass(eq=False)
class Submission:
    """One caller's consecutive records, from arrival until written or refused."""

    records: list[SealedAuditRecord]
    deadline: float
    written: bool = False
    error: SigndError | None = field(default=None, repr=False)
    asynchronous: bool = False
    """Submitted (:meth:`FileAuditLog.submit`): nobody waits in :meth:`append_many` for it."""
    listeners: list[Callable[[SigndError | None], None]] = field(default_factory=list, repr=False)
    """Told once, with ``None`` when written or the error when refused (lock held)."""

    @property
    def settled(self) -> bool:
        return self.written or self.error is not None

    def settle(self, error: SigndError | None = None) -> None:
        """Mark written (no ``error``) or refused, and tell the listeners."""
        if self.settled:
            return
        if error is None:
            self.written = True
        else:
            self.error = error
        for listener in self.listeners:
            listener(None if error is None else _fresh(error))
        self.listeners.clear()

    @property
    def first(self) -> SealedAuditRecord:
        return self.records[0]

    @property
    def last(self) -> SealedAuditRecord:
        return self.records[-1]


class FileAuditLog:
    """JSON lines, appended with group commit: one write and one fsync per group.

    Opening reads only the last line (from the end of the file), so it is quick however
    long the log is. A final line without its newline (a write torn by a crash) is an
    :class:`~signd.errors.IntegrityError`: an operator must look at it.

    Only whole, chained records reach the file, in ``seq`` order. When a write or fsync
    fails, every caller in that group, and every caller whose records follow them, gets a
    :class:`~signd.errors.DependencyUnavailable`; the file is truncated back to its last
    durable record (if even that fails, the log refuses every later append). A refused
    caller's records never reach the file, nor do records that follow them.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        order_timeout: float = DEFAULT_ORDER_TIMEOUT,
        commit_interval: float = DEFAULT_COMMIT_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.order_timeout = order_timeout
        self.commit_interval = commit_interval
        self._group_started = -math.inf
        self._last = _read_last_record(self.path)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        opened = os.fstat(self._fd)
        self._size = opened.st_size
        self._identity = (opened.st_dev, opened.st_ino)
        """The file opened: records written to it once another file (or none) is at
        ``path`` would not be in the log anyone reads (see :meth:`_elsewhere`)."""
        if not existed:
            files.sync_folder(self.path.parent)
        lock = threading.Lock()
        self._state = threading.Condition(lock)
        self._work = threading.Condition(lock)
        """Wakes the writer thread of submissions (same lock as ``_state``)."""
        self._writer: threading.Thread | None = None
        self._pacing = False
        """The writer thread waits out ``commit_interval`` before its next group: a wake-up
        would not start it sooner (the thread looks at what waits once the wait is over)."""
        self._waiting: dict[int, Submission] = {}
        """Every record's ``seq`` that has arrived and is not yet being written."""
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._in_write: list[Submission] = []
        """The group being written (the lock is released meanwhile); empty when none is."""
        self._taken = self.head.seq
        """The last ``seq`` written or being written."""
        self._closed = False
        self._unusable: str | None = None
        """Why every append is refused, once the log is closed or broken."""

    def __repr__(self) -> str:
        return f"FileAuditLog(path={str(self.path)!r}, seq={self.head.seq})"

    def __enter__(self) -> FileAuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the write in progress, refuse the callers still waiting, close the file."""
        with self._state:
            while self._writing:
                self._state.wait()
            if self._closed:
                return
            self._closed = True
            self._unusable = "the audit log is closed"
            for pending in set(self._waiting.values()):
                self._refuse(pending, DependencyUnavailable(self._unusable))
            os.close(self._fd)
            self._work.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    @property
    def head(self) -> ChainHead:
        return GENESIS if self._last is None else self._last.head

    def last_hash(self) -> bytes:
        return self.head.hash

    def last_record(self) -> SealedAuditRecord | None:
        return self._last

    def wait_for_appends(self, timeout: float) -> None:
        """Return once every record handed in before this call is durable or refused: until
        then, one being written or waiting for its predecessors may still extend the log, so
        :meth:`last_record` may not be where the log will end for them. A reader that must
        see every record already handed out (the tail a restarted enclave rebuilds its spend
        windows from) waits here first. :class:`~signd.errors.DependencyUnavailable` if they
        are not settled within ``timeout`` seconds (a write that hangs)."""
        deadline = time.monotonic() + timeout
        with self._state:
            handed_in = {*self._waiting.values(), *self._in_write}
            while not all(pending.settled for pending in handed_in):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DependencyUnavailable(
                        f"records handed to the audit log {self.path} were not written "
                        f"within {timeout:g} s"
                    )
                self._state.wait(remaining)

    def append(self, sealed: SealedAuditRecord) -> None:
        self.append_many([sealed])

    def submit(self, sealed: Sequence[SealedAuditRecord], *, wake: bool = True) -> Submission:
        """:meth:`append_many` without waiting: the submission, whose listeners
        (:meth:`listen`) hear once the records are durable or why they are not. Records
        refused on arrival raise here.

        ``wake=False`` leaves the writer thread asleep: the caller promises a :meth:`wake`
        soon (an event loop wakes it once per pass, for all the requests of that pass)."""
        pending = self._checked(sealed)
        pending.asynchronous = True
        if not pending.records:
            pending.settle()
            return pending
        with self._state:
            self._admit(pending)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_submissions, name="signd-audit-writer", daemon=True
                )
                self._writer.start()
            if wake:
                self._wake_writer()
        return pending

    def listen(self, submission: Submission, listener: Callable[[SigndError | None], None]) -> None:
        """Tell ``listener`` how ``submission`` ended: ``None`` once its records are durable,
        else the error. At once if it has ended; otherwise from the thread that ends it,
        with the log's lock held (so the listener must be quick and leave the log alone)."""
        with self._state:
            if not submission.settled:
                submission.listeners.append(listener)
                return
        listener(None if submission.error is None else _fresh(submission.error))

    def wake(self) -> None:
        """Wake the writer thread of submissions."""
        with self._state:
            self._wake_writer()

    def append_many(self, sealed: Sequence[SealedAuditRecord]) -> None:
        pending = self._checked(sealed)
        if not pending.records:
            return
        with self._state:
            self._admit(pending)
            while not pending.written:
                if pending.error is not None:
                    raise _fresh(pending.error)
                if not self._writing and self.head.seq + 1 in self._waiting:
                    self._write_group()
                    continue
                if pending.first.record.seq not in self._waiting:
                    self._state.wait()  # in the group being written
                    continue
                remaining = pending.deadline - time.monotonic()
                if remaining <= 0:
                    self._refuse(
                        pending,
                        AuditOrderError(
                            f"audit record {pending.first.record.seq} waited "
                            f"{self.order_timeout:g} s for record {self.head.seq + 1}"
                        ),
                    )
                    continue
                self._state.wait(remaining)

    def _checked(self, sealed: Sequence[SealedAuditRecord]) -> Submission:
        pending = Submission(list(sealed), time.monotonic() + self.order_timeout)
        for before, record in zip(pending.records, pending.records[1:], strict=False):
            if record.record.seq != before.record.seq + 1 or record.prev_hash != before.hash:
                raise IntegrityError(
                    f"audit record {record.record.seq} does not follow record "
                    f"{before.record.seq} in the same append"
                )
        return pending

    def _write_submissions(self) -> None:
        """The writer thread: writes whatever extends the log, and refuses submissions that
        waited too long for their predecessors (callers of :meth:`append_many` write and
        time out for themselves)."""
        with self._state:
            while not self._closed:
                now = time.monotonic()
                if not self._writing and self.head.seq + 1 in self._waiting:
                    early = self._group_started + self.commit_interval - now
                    if early <= 0:
                        self._write_group()
                    else:
                        self._pacing = True
                        try:
                            self._work.wait(early)
                        finally:
                            self._pacing = False
                    continue
                overdue = [
                    pending
                    for pending in set(self._waiting.values())
                    if pending.asynchronous and pending.deadline <= now
                ]
                for pending in overdue:
                    if pending.error is None:
                        self._refuse(
                            pending,
                            AuditOrderError(
                                f"audit record {pending.first.record.seq} waited "
                                f"{self.order_timeout:g} s for record {self.head.seq + 1}"
                            ),
                        )
                deadlines = [
                    pending.deadline for pending in self._waiting.values() if pending.asynchronous
                ]
                self._work.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def records(self) -> Iterator[SealedAuditRecord]:
        with open(self.path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    yield SealedAuditRecord.from_json(line)
                except IntegrityError as exc:
                    raise IntegrityError(f"audit log line {number}: {exc.message}") from None

    # with self._state held

    def _wake_writer(self) -> None:
        """Wake the writer thread, unless it will look at what waits without it: while it
        paces its groups, or while a group is being written (the writer's ``_write_group``
        notifies when that is over). Each needless wake-up costs a thread switch."""
        if not self._pacing and not self._writing:
            self._work.notify()

    def _admit(self, pending: Submission) -> None:
        """Take ``pending`` in to wait for its turn, or raise why it is refused."""
        self._retry_undo()
        if self._unusable is not None:
            raise DependencyUnavailable(self._unusable)
        first = pending.first.record.seq
        problem = None
        if first <= self._taken:
            problem = f"audit record {first} does not extend the log (last record is {self._taken})"
        elif any(record.record.seq in self._waiting for record in pending.records):
            problem = f"audit record {first} is already waiting to be stored"
        elif pending.first.prev_hash in self._refused:
            problem = f"audit record {first} follows a record that was not stored"
        if problem is not None:
            raise AuditOrderError(problem)  # its hashes are not refused: it may be a retry
        for record in pending.records:
            self._waiting[record.record.seq] = pending

    def _write_group(self) -> None:
        """Write every record that extends the log without a gap, as one write and fsync.

        Called with the lock held and no write in progress; releases the lock while writing.
        """
        group: list[Submission] = []
        head = self.head
        while (pending := self._waiting.get(head.seq + 1)) is not None:
            if pending.first.record.seq != head.seq + 1 or pending.first.prev_hash != head.hash:
                self._refuse(
                    pending,
                    AuditOrderError(
                        f"audit record {head.seq + 1} does not extend the log "
                        f"(its prev_hash is not record {head.seq}'s hash)"
                    ),
                )
                break
            for record in pending.records:
                del self._waiting[record.record.seq]
            group.append(pending)
            head = pending.last.head
        if not group:
            return
        self._group_started = time.monotonic()
        self._in_write = group
        self._taken = head.seq
        self._state.release()
        failure: SigndError | None = DependencyUnavailable("the audit log write was interrupted")
        try:
            failure = self._write(
                b"".join(
                    (record.to_json() + "\n").encode("ascii")
                    for pending in group
                    for record in pending.records
                )
            )
        finally:
            self._state.acquire()
            self._in_write = []
            self._work.notify()  # the writer thread takes what arrived meanwhile
            if failure is None:
                self._last = group[-1].last
                for pending in group:
                    pending.settle()
                self._state.notify_all()
            else:
                self._taken = self.head.seq
                for pending in group:
                    self._refuse(pending, failure)

    @property
    def _writing(self) -> bool:
        return bool(self._in_write)

    def _write(self, data: bytes) -> DependencyUnavailable | None:
        """Append ``data`` and fsync; on failure, cut the file back to where it was."""
        start = self._size
        elsewhere = self._elsewhere()
        if elsewhere is not None:
            return DependencyUnavailable(elsewhere)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except BaseException as exc:
            self._undo(start)
            if not isinstance(exc, OSError):
                raise
            why = os.strerror(exc.errno or errno.EIO)
            return DependencyUnavailable(f"the audit log could not be written ({why})")
        self._size = start + len(data)
        return None

    def _undo(self, size: int) -> None:
        """Cut the file back to ``size`` bytes, durably; if that fails, refuse every append
        until :meth:`_retry_undo` manages it."""
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:
            self._unusable = (
                "the audit log is unusable: a failed write could not be undone "
                f"({os.strerror(exc.errno or errno.EIO)}); it is retried at each request"
            )

    def _retry_undo(self) -> None:
        """With the lock held: if a failed write could not be undone, try again (the file
        may be writable again), so that the log recovers without a restart. The file is cut
        back to its last durable size, which holds exactly the records acknowledged."""
        if self._unusable is None or self._closed or self._writing:
            return
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            return
        self._unusable = None
        log.warning("the audit log is writable again; the failed write is undone")

    def check_health(self) -> None:
        """Raise :class:`DependencyUnavailable` while the log cannot take records (closed, a
        failed write not yet undone: each call retries the undo, or the file open no longer
        the one at ``path``)."""
        with self._state:
            self._retry_undo()
            if self._unusable is not None:
                raise DependencyUnavailable(self._unusable)
        elsewhere = self._elsewhere()
        if elsewhere is not None:
            raise DependencyUnavailable(elsewhere)

    def _elsewhere(self) -> str | None:
        """Why no record may be written, if the file at ``path`` is not the one open (renamed
        away, deleted or replaced: a volume swapped underneath); else ``None``."""
        try:
            found = os.stat(self.path)
        except OSError:
            found = None
        if found is not None and (found.st_dev, found.st_ino) == self._identity:
            return None
        return (
            f"the audit log open is not the file at {self.path} (moved, deleted or replaced "
            "while signd runs): put it back, or restart signd"
        )

    def _refuse(self, pending: Submission, error: SigndError) -> None:
        """Refuse admitted records and, since they can no longer be chained, their successors
        (those waiting now, and those arriving later)."""
        pending.settle(error)
        refused = [pending]
        while refused:
            current = refused.pop()
            for record in current.records:
                if self._waiting.get(record.record.seq) is current:
                    del self._waiting[record.record.seq]
                self._refused[record.hash] = None
            for waiting in set(self._waiting.values()):
                if waiting.error is None and waiting.first.prev_hash in self._refused:
                    waiting.settle(error)
                    refused.append(waiting)
        while len(self._refused) > MAX_REFUSED_HASHES:
            self._refused.popitem(last=False)
        self._state.notify_all()


@dataclass(eq=False)
class DeferredAppends:
    """The submissions made inside :func:`deferring_appends`, with their logs, whose writer
    threads were left asleep (``wake=False``) for the caller to :meth:`wake
    <FileAuditLog.wake>`."""

    submissions: list[tuple[FileAuditLog, Submission]] = field(default_factory=list)
    logs: list[FileAuditLog] = field(default_factory=list)


_DEFERRED: ContextVar[DeferredAppends | None] = ContextVar("signd_audit_deferred", default=None)


class deferring_appends:  # noqa: N801 - used as a function-like context manager
    """Within this block (and the threads it hands work to), :func:`store_records` submits
    to a :class:`FileAuditLog` instead of waiting: whoever entered the block must wake the
    logs and wait for every submission before releasing any result those records account
    for.

    A class rather than a generator: every signing request enters it twice."""

    __slots__ = ("_deferred", "_token")

    _deferred: DeferredAppends
    _token: Token[DeferredAppends | None]

    def __enter__(self) -> DeferredAppends:
        self._deferred = DeferredAppends()
        self._token = _DEFERRED.set(self._deferred)
        return self._deferred

    def __exit__(self, *exc_info: object) -> None:
        _DEFERRED.reset(self._token)


def store_records(
    store: AuditLog,
    sealed: Sequence[SealedAuditRecord],
    *,
    failed: Callable[[BaseException], None],
    finished: Callable[[], None] = lambda: None,
    wait: bool = False,
) -> None:
    """Append ``sealed`` to ``store``: durably before returning, or, inside
    :func:`deferring_appends` and unless ``wait``, submitted. ``failed`` hears of a failure
    (then the error is raised, or the submission ends with it) and ``finished`` is called
    once the append is over, either way: at once, or when the submission ends (from the
    writer's thread). ``wait`` is for a caller that must act on the outcome itself (it
    costs its thread the wait for the fsync)."""
    deferred = _DEFERRED.get()
    if wait or deferred is None or not isinstance(store, FileAuditLog):
        try:
            store.append_many(sealed)
        except BaseException as exc:
            failed(exc)
            raise
        finally:
            finished()
        return
    try:
        submission = store.submit(sealed, wake=False)
    except BaseException as exc:
        failed(exc)
        finished()
        raise

    def ended(error: SigndError | None) -> None:
        try:
            if error is not None:
                failed(error)
        finally:
            finished()

    store.listen(submission, ended)
    deferred.submissions.append((store, submission))
    if store not in deferred.logs:
        deferred.logs.append(store)


def _fresh(error: SigndError) -> SigndError:
    """A copy of a group's error for one caller (one exception object per raise)."""
    return type(error)(error.message, field=error.field)


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
