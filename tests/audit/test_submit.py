"""Submissions: appends that return at once and tell their listeners once the records are
durable (or why not), written by the log's writer thread in groups."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from signd.audit import FileAuditLog, SealedAuditRecord, verify_chain
from signd.audit.log import AuditOrderError, deferring_appends, store_records
from signd.errors import DependencyUnavailable, SigndError
from tests.audit.conftest import MAC_KEY, build_chain

WAIT = 5.0


class Outcome:
    """A listener that remembers how a submission ended."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.error: SigndError | None = None

    def __call__(self, error: SigndError | None) -> None:
        self.error = error
        self.ended.set()

    def wait(self) -> SigndError | None:
        assert self.ended.wait(WAIT), "the submission never ended"
        return self.error


def lines(path: Path) -> list[SealedAuditRecord]:
    return [SealedAuditRecord.from_json(line) for line in path.read_bytes().splitlines()]


def test_listeners_hear_once_the_records_are_durable(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    chain = build_chain(5)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    with pytest.MonkeyPatch.context() as patch, FileAuditLog(path) as log:
        patch.setattr(os, "fsync", fsync)
        heard: list[int] = []

        def listener(error: SigndError | None) -> None:
            assert error is None
            heard.append(synced[-1])  # an fsync covering the records came first

        submission = log.submit(chain[:3])
        log.listen(submission, listener)
        rest = Outcome()
        log.listen(log.submit(chain[3:]), rest)
        assert rest.wait() is None
        assert heard and heard[0] > 0
    assert lines(path) == chain
    assert verify_chain(lines(path), MAC_KEY).ok


def test_a_sleeping_writer_writes_one_group_when_woken(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    chain = build_chain(41)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    with pytest.MonkeyPatch.context() as patch, FileAuditLog(path) as log:
        first = Outcome()
        log.listen(log.submit(chain[:1]), first)  # starts the writer, which then sleeps
        assert first.wait() is None
        time.sleep(0.05)
        size = path.stat().st_size
        patch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
        outcomes = []
        for record in chain[1:]:
            outcome = Outcome()
            log.listen(log.submit([record], wake=False), outcome)
            outcomes.append(outcome)
        time.sleep(0.05)
        assert path.stat().st_size == size and not fsyncs  # nobody woke the writer
        log.wake()
        assert all(outcome.wait() is None for outcome in outcomes)
        assert len(fsyncs) == 1
    assert lines(path) == chain


def test_submissions_arriving_out_of_order_are_written_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    chain = build_chain(6)
    with FileAuditLog(path) as log:
        later, earlier = Outcome(), Outcome()
        log.listen(log.submit(chain[3:]), later)
        time.sleep(0.05)
        assert not later.ended.is_set()  # waits for records 1-3
        log.listen(log.submit(chain[:3]), earlier)
        assert earlier.wait() is None and later.wait() is None
    assert lines(path) == chain


def test_a_submission_whose_predecessors_never_come_is_refused(tmp_path: Path) -> None:
    chain = build_chain(3)
    with FileAuditLog(tmp_path / "audit.log", order_timeout=0.2) as log:
        orphan = Outcome()
        log.listen(log.submit(chain[1:]), orphan)
        assert isinstance(orphan.wait(), AuditOrderError)  # a 503: the predecessor was lost
        assert "waited" in str(orphan.error)


def test_a_failed_fsync_fails_the_group_and_cuts_the_file_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    chain = build_chain(4)
    real_fsync = os.fsync
    with FileAuditLog(path) as log:
        first = Outcome()
        log.listen(log.submit(chain[:2]), first)
        assert first.wait() is None
        size = path.stat().st_size

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", failing)
            second = Outcome()
            log.listen(log.submit(chain[2:]), second)
            assert isinstance(second.wait(), DependencyUnavailable)
        patch.setattr(os, "fsync", real_fsync)
        assert path.stat().st_size == size
        assert log.head == chain[1].head


def test_a_write_that_cannot_be_undone_is_retried_until_the_log_recovers(tmp_path: Path) -> None:
    """The file refuses both the write and the cut back (as with ``chattr +i``): the log
    takes no record and says so to health checks, until the file is writable again, when
    the undo is retried and the log goes on, without a restart."""
    path = tmp_path / "audit.log"
    chain = build_chain(4)
    real_fsync, real_ftruncate = os.fsync, os.ftruncate

    def refused(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    with FileAuditLog(path) as log:
        first = Outcome()
        log.listen(log.submit(chain[:2]), first)
        assert first.wait() is None
        size = path.stat().st_size
        log.check_health()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", refused)
            patch.setattr(os, "ftruncate", refused)
            second = Outcome()
            log.listen(log.submit(chain[2:]), second)
            assert isinstance(second.wait(), DependencyUnavailable)
            with pytest.raises(DependencyUnavailable, match="could not be undone"):
                log.check_health()
            with pytest.raises(DependencyUnavailable, match="could not be undone"):
                log.submit(chain[2:])
        assert (os.fsync, os.ftruncate) == (real_fsync, real_ftruncate)
        log.check_health()  # the undo, retried, works now
        assert path.stat().st_size == size
        third = Outcome()
        log.listen(log.submit(chain[2:]), third)
        assert third.wait() is None
    assert lines(path) == chain
    assert verify_chain(lines(path), MAC_KEY).ok


def test_listening_after_the_end_is_told_at_once(tmp_path: Path) -> None:
    chain = build_chain(1)
    with FileAuditLog(tmp_path / "audit.log") as log:
        submission = log.submit(chain)
        first = Outcome()
        log.listen(submission, first)
        assert first.wait() is None
        late = Outcome()
        log.listen(submission, late)
        assert late.ended.is_set() and late.error is None


def test_closing_refuses_what_still_waits(tmp_path: Path) -> None:
    chain = build_chain(3)
    log = FileAuditLog(tmp_path / "audit.log")
    waiting = Outcome()
    log.listen(log.submit(chain[1:]), waiting)  # waits for record 1, which never comes
    log.close()
    assert isinstance(waiting.wait(), DependencyUnavailable)


def test_store_records_submits_inside_deferring_appends_and_waits_outside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    chain = build_chain(2)
    failures: list[BaseException] = []
    finished: list[bool] = []
    with FileAuditLog(path) as log:
        with deferring_appends() as deferred:
            store_records(
                log, chain[:1], failed=failures.append, finished=lambda: finished.append(True)
            )
        [(store, submission)] = deferred.submissions
        assert store is log and deferred.logs == [log]
        log.wake()
        outcome = Outcome()
        log.listen(submission, outcome)
        assert outcome.wait() is None
        store_records(
            log, chain[1:], failed=failures.append, finished=lambda: finished.append(True)
        )
        assert lines(path) == chain  # outside the block: durable on return
    assert not failures and finished == [True, True]


def test_waiting_for_appends_sees_the_records_handed_in_before(tmp_path: Path) -> None:
    """The last record once the records already handed in are written (or refused): one
    being written, one waiting for it, not a record handed in afterwards."""
    chain = build_chain(4)
    writing, disk_done = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        writing.set()
        disk_done.wait(WAIT)
        real_fsync(fd)

    with (
        pytest.MonkeyPatch.context() as patch,
        FileAuditLog(path := tmp_path / "a.log", order_timeout=0.5) as log,
    ):
        patch.setattr(os, "fsync", slow_fsync)
        log.submit(chain[:1])
        assert writing.wait(WAIT)  # record 1 is being written
        log.submit(chain[1:2])  # record 2 waits for it
        assert log.last_record() is None
        with pytest.raises(DependencyUnavailable, match=r"not written within 0\.2 s"):
            log.wait_for_appends(0.2)
        threading.Timer(0.2, disk_done.set).start()
        log.wait_for_appends(WAIT)
        assert log.last_record() == chain[1]
        assert lines(path) == chain[:2]
        log.submit(chain[3:])  # a gap: it waits for record 3, which never comes
        started = time.monotonic()
        log.wait_for_appends(WAIT)  # refused once its order timeout passes
        assert time.monotonic() - started < WAIT
        assert log.last_record() == chain[1]


def test_a_writer_pacing_its_groups_is_not_woken_for_each_submission(tmp_path: Path) -> None:
    """Between two groups the writer waits out ``commit_interval``: a wake-up then would only
    cost a thread switch, and the records submitted meanwhile go out together after it."""
    path = tmp_path / "audit.log"
    chain = build_chain(11)
    with FileAuditLog(path, commit_interval=0.5) as log:
        first = Outcome()
        log.listen(log.submit(chain[:1]), first)  # written at once, and the pacing starts
        assert first.wait() is None
        waits: list[str] = []
        real_wait = log._work.wait

        def wait(timeout: float | None = None) -> bool:
            waits.append(threading.current_thread().name)
            return real_wait(timeout)

        log._work.wait = wait  # type: ignore[method-assign]
        outcomes = []
        for record in chain[1:]:
            outcome = Outcome()
            log.listen(log.submit([record]), outcome)  # each one asks for a wake-up
            log.wake()
            outcomes.append(outcome)
            time.sleep(0.01)  # time for a writer woken to wait again
        assert all(outcome.wait() is None for outcome in outcomes)
        assert len(waits) <= 2  # the pacing wait, and one for what arrived while writing
    assert lines(path) == chain
