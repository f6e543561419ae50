"""Group commit: concurrent appends share a write and an fsync, in ``seq`` order, and nobody
returns before their records are durable; failures reach every writer of the group."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from signd.audit import AuditSigner, FileAuditLog, SealedAuditRecord, verify_chain
from signd.audit.log import AuditOrderError
from signd.cli.context import state
from signd.cli.main import app
from signd.errors import DependencyUnavailable, SigndError
from signd.gate.audit import AuditEntry, AuditTrail
from tests.audit.conftest import MAC_KEY, OTHER_KEY, build_chain, ticking_clock

THREADS = 16
ENTRY: AuditEntry = {"operation": "sign:hash", "decision": "allowed", "reason": "rule r"}


class Disk:
    """Wraps ``os.fsync`` and ``os.write``: counts fsyncs, notes how far the file was synced,
    and can slow them down or fail them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fsyncs = 0
        self.synced = 0
        self.delay = 0.0
        self.fail_fsync_number = 0
        """Fail this fsync (counting from 1); 0 for none."""
        self.fail_write = False
        self._lock = threading.Lock()
        self._fsync, self._write = os.fsync, os.write
        monkeypatch.setattr(os, "fsync", self.fsync)
        monkeypatch.setattr(os, "write", self.write)

    def fsync(self, fd: int) -> None:
        with self._lock:
            self.fsyncs += 1
            number = self.fsyncs
        time.sleep(self.delay)
        if number == self.fail_fsync_number:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._fsync(fd)
        with self._lock:
            self.synced = max(self.synced, os.fstat(fd).st_size)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.fail_write:
            self._write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    return Disk(monkeypatch)


def run_threads(count: int, work: Callable[[int], None]) -> list[BaseException | None]:
    """Run ``work(n)`` on ``count`` threads started together; what each raised (or None)."""
    outcomes: list[BaseException | None] = [None] * count
    start = threading.Barrier(count)

    def body(n: int) -> None:
        start.wait()
        try:
            work(n)
        except BaseException as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=body, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return outcomes


def end_of(path: Path, **wanted: object) -> int:
    """The byte offset where the line of the record with these fields ends in the file."""
    offset = 0
    with path.open("rb") as lines:
        for line in lines:
            offset += len(line)
            record = json.loads(line)["record"]
            if all(record[name] == value for name, value in wanted.items()):
                return offset
    raise AssertionError(f"no record with {wanted} in the log")


def assert_log_verifies(path: Path, count: int) -> list[SealedAuditRecord]:
    with FileAuditLog(path) as log:  # reopening also refuses a torn last line
        records = list(log.records())
        report = verify_chain(records, MAC_KEY, expected_head=log.head)
    assert report.ok, report.problems
    assert [s.record.seq for s in records] == list(range(1, count + 1))
    return records


def test_concurrent_writers_share_fsyncs_and_return_once_durable(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    disk.delay = 0.005
    trail = AuditTrail(MAC_KEY, "node-a", FileAuditLog(path))
    rounds = 10
    durable_on_return: list[bool] = []

    def work(n: int) -> None:
        for round_ in range(rounds):
            marker = f"client-{n}-{round_}"
            trail.write([ENTRY | {"client_id": marker}, ENTRY | {"key_id": marker}])
            durable_on_return.append(disk.synced >= end_of(path, key_id=marker))

    assert run_threads(THREADS, work) == [None] * THREADS
    trail.close()
    assert all(durable_on_return)
    assert 0 < disk.fsyncs < THREADS * rounds / 2  # writers shared fsyncs
    assert_log_verifies(path, THREADS * rounds * 2)


def test_each_writer_returns_only_after_its_own_records_are_synced(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    disk.delay = 0.002
    chain = build_chain(THREADS * 4)
    groups = [chain[n : n + 2] for n in range(0, len(chain), 2)]
    random.Random(6).shuffle(groups)
    with FileAuditLog(path) as log:

        def work(n: int) -> None:
            log.append_many(groups[n])
            assert disk.synced >= end_of(path, seq=groups[n][-1].record.seq)

        assert run_threads(len(groups), work) == [None] * len(groups)
    assert_log_verifies(path, len(chain))


def test_records_arriving_out_of_order_are_written_in_seq_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain = build_chain(40)
    arrival = list(range(len(chain)))
    random.Random(1).shuffle(arrival)
    with FileAuditLog(path) as log:

        def work(n: int) -> None:
            time.sleep(arrival[n] * 0.002)
            log.append(chain[n])

        assert run_threads(len(chain), work) == [None] * len(chain)
        assert log.head == chain[-1].head
    assert assert_log_verifies(path, len(chain)) == chain


def test_a_failed_fsync_fails_every_writer_waiting_on_it_and_the_file_keeps_whole_records(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    chain = build_chain(THREADS + 1)
    with FileAuditLog(path) as log:
        log.append(chain[0])
        disk.delay = 0.3  # the others pile up behind the next write
        disk.fail_fsync_number = disk.fsyncs + 1

        def work(n: int) -> None:
            time.sleep(0.01 * (n > 0))  # record 2 first, the rest while it is written
            log.append(chain[n + 1])

        outcomes = run_threads(THREADS, work)
        assert log.head.seq == 1
        assert log.last_record() == chain[0]
    assert all(isinstance(outcome, DependencyUnavailable) for outcome in outcomes), outcomes
    assert "could not be written" in str(outcomes[0])
    assert len({id(outcome) for outcome in outcomes}) == THREADS  # one exception each
    assert assert_log_verifies(path, 1) == chain[:1]


def test_a_torn_write_is_cut_back_and_the_chain_continues_from_the_log(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(MAC_KEY, "node-a", FileAuditLog(path))
    trail.write([ENTRY] * 3)
    disk.fail_write = True
    with pytest.raises(DependencyUnavailable, match="No space left"):
        trail.write([ENTRY] * 2)
    assert path.read_bytes().endswith(b"\n")
    disk.fail_write = False
    trail.write([ENTRY])
    trail.close()
    assert_log_verifies(path, 4)


def test_after_a_failure_the_trail_reseeds_once_and_late_records_of_the_old_chain_are_refused(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(MAC_KEY, "node-a", FileAuditLog(path))
    trail.write([ENTRY])
    disk.delay = 0.02
    disk.fail_fsync_number = disk.fsyncs + 1
    outcomes = run_threads(THREADS, lambda n: trail.write([ENTRY, ENTRY]))
    failed = [outcome for outcome in outcomes if outcome is not None]
    assert failed and all(isinstance(outcome, SigndError) for outcome in failed), outcomes
    written = 1 + 2 * outcomes.count(None)
    disk.delay = 0.0
    assert run_threads(THREADS, lambda n: trail.write([ENTRY])) == [None] * THREADS
    trail.close()
    assert_log_verifies(path, written + THREADS)


def test_successors_of_a_refused_record_are_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain = build_chain(4)
    with FileAuditLog(path, order_timeout=1.0) as log:
        log.append(chain[0])
        with pytest.raises(AuditOrderError, match="record 3 waited"):
            log.append(chain[2])
        started = time.monotonic()
        with pytest.raises(AuditOrderError, match="record 4 follows a record that was not stored"):
            log.append(chain[3])
        assert time.monotonic() - started < 0.5  # not after an order timeout of its own
        log.append_many(chain[1:])  # the same records again, in order, are stored
    assert assert_log_verifies(path, 4) == chain


def test_a_record_from_another_chain_is_refused_with_the_records_that_follow_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    ours = build_chain(3)
    theirs = build_chain(3, AuditSigner(OTHER_KEY, "node-b", now=ticking_clock(1.0)))
    with FileAuditLog(path) as log:
        log.append(ours[0])

        def work(n: int) -> None:
            if n == 1:
                time.sleep(0.05)  # record 3 waits for record 2, then 2 breaks the chain
            log.append(theirs[2 - n])

        outcomes = run_threads(2, work)
        assert all(
            isinstance(outcome, AuditOrderError) and "does not extend" in outcome.message
            for outcome in outcomes
        ), outcomes
        log.append_many(ours[1:])
    assert assert_log_verifies(path, 3) == ours


def test_a_second_record_with_the_same_seq_is_refused(tmp_path: Path) -> None:
    chain = build_chain(3)
    other = build_chain(3, AuditSigner(MAC_KEY, "node-b", now=ticking_clock(1.0)))
    with FileAuditLog(tmp_path / "audit.jsonl", order_timeout=0.2) as log:
        log.append(chain[0])
        waiting = threading.Thread(target=lambda: log.append(chain[2]))
        waiting.start()
        time.sleep(0.05)
        with pytest.raises(AuditOrderError, match="record 3 is already waiting"):
            log.append(other[2])
        log.append(chain[1])
        waiting.join()
        assert log.head == chain[2].head


def test_a_log_whose_failed_write_cannot_be_undone_refuses_every_append_until_it_can(
    tmp_path: Path, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = build_chain(3)
    disk.fail_write = True
    real_ftruncate = os.ftruncate

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with FileAuditLog(tmp_path / "audit.jsonl") as log:
        with pytest.raises(DependencyUnavailable, match="could not be written"):
            log.append(chain[0])
        disk.fail_write = False
        with pytest.raises(DependencyUnavailable, match=r"unusable.*could not be undone"):
            log.append(chain[0])
        monkeypatch.setattr(os, "ftruncate", real_ftruncate)
        log.append(chain[0])  # the undo, retried, works: the log goes on
    assert_log_verifies(tmp_path / "audit.jsonl", 1)


def test_closing_refuses_the_writers_still_waiting(tmp_path: Path) -> None:
    chain = build_chain(3)
    log = FileAuditLog(tmp_path / "audit.jsonl")
    outcomes: list[BaseException] = []

    def wait_for_record_1() -> None:
        try:
            log.append(chain[1])
        except BaseException as exc:
            outcomes.append(exc)

    waiting = threading.Thread(target=wait_for_record_1)
    waiting.start()
    time.sleep(0.05)
    log.close()
    waiting.join()
    assert isinstance(outcomes[0], DependencyUnavailable) and "closed" in str(outcomes[0])
    with pytest.raises(DependencyUnavailable, match="closed"):
        log.append(chain[0])
    log.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    key_file = home / "audit.key"
    key_file.write_text(MAC_KEY.reveal_bytes().hex() + "\n")
    key_file.chmod(0o600)
    yield home
    state.close()


def test_signd_audit_verify_accepts_a_log_written_by_concurrent_writers(home: Path) -> None:
    path = home / "audit.log"
    trail = AuditTrail(MAC_KEY, "node-a", FileAuditLog(path))

    def work(n: int) -> None:
        for _ in range(5):
            trail.write([ENTRY] * (1 + n % 3))

    assert run_threads(THREADS, work) == [None] * THREADS
    trail.close()
    state.close()
    result = CliRunner().invoke(
        app,
        ["--home", str(home), "audit", "verify", "--json", "--key", str(home / "audit.key")],
    )
    report = json.loads(result.stdout)
    assert result.exit_code == 0, report
    assert report["ok"] and report["problems"] == []
    assert report["records"] == sum(5 * (1 + n % 3) for n in range(THREADS))
