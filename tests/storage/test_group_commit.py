"""Group commit: concurrent adds share one transaction, and each still gets its own outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from signd.errors import DependencyUnavailable, KeyExists
from signd.storage.base import KeyRecord
from signd.storage.metadata import SqlMetadataStore
from tests.storage.test_metadata_contract import list_all, record

QUEUED = 8


class Transactions:
    """Counts the store's insert transactions; the first one waits, holding the others off."""

    def __init__(self, store: SqlMetadataStore, fail: Callable[[int], bool]) -> None:
        self.count = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._store = store
        self._fail = fail
        self._lock_inserts = store._lock_inserts

    def lock_inserts(self, cursor: object) -> None:
        self.count += 1
        if self.count == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self._fail(self.count):
            raise DependencyUnavailable("the database went away mid-transaction")
        self._lock_inserts(cursor)  # type: ignore[arg-type]


@contextmanager
def queued_behind_one_transaction(
    store: SqlMetadataStore,
    monkeypatch: pytest.MonkeyPatch,
    batches: list[list[KeyRecord]],
    fail: Callable[[int], bool] = lambda _: False,
) -> Iterator[tuple[Transactions, list[Future[None]]]]:
    """Add one record (its transaction held open), queue ``batches`` behind it, then let go."""
    transactions = Transactions(store, fail)
    monkeypatch.setattr(store, "_lock_inserts", transactions.lock_inserts)
    with ThreadPoolExecutor(len(batches) + 1) as pool:
        first = pool.submit(store.add, [record()])
        assert transactions.entered.wait(10)
        futures = [pool.submit(store.add, batch) for batch in batches]
        deadline = time.monotonic() + 10
        while len(store._queued) < len(batches):
            assert time.monotonic() < deadline, "the adds did not queue"
            time.sleep(0.005)
        transactions.release.set()
        first.result()
        yield transactions, futures


def test_adds_that_queue_behind_a_transaction_share_the_next_one(
    metadata_store: SqlMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [[record(labels=[f"t{i}", "all"]) for _ in range(3)] for i in range(QUEUED)]
    with queued_behind_one_transaction(metadata_store, monkeypatch, batches) as (done, futures):
        for future in futures:
            future.result()
    assert done.count == 2
    listed = list_all(metadata_store, 100)
    assert len(listed) == 1 + 3 * QUEUED
    for i, batch in enumerate(batches):
        positions = [listed.index(r) for r in batch]
        assert positions == list(range(positions[0], positions[0] + len(batch)))
        assert list_all(metadata_store, 100, label=f"t{i}") == batch
    assert len(list_all(metadata_store, 100, label="all")) == 3 * QUEUED


def test_a_duplicate_fails_only_the_add_that_holds_it(
    metadata_store: SqlMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata_store.add([taken := record()])
    batches = [[record(), record()] for _ in range(QUEUED)]
    batches[3] = [record(), record(address=taken.address)]
    with queued_behind_one_transaction(metadata_store, monkeypatch, batches) as (done, futures):
        outcomes = [future.exception(10) for future in futures]
    assert isinstance(outcomes[3], KeyExists)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [None] * (QUEUED - 1)
    assert done.count == 2 + QUEUED  # the shared attempt, then one transaction per add
    for i, batch in enumerate(batches):
        found = [metadata_store.find(r.key_id) for r in batch]
        assert found == ([None, None] if i == 3 else batch)


def test_a_failed_shared_transaction_fails_every_add_in_it_and_stores_nothing(
    metadata_store: SqlMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [[record()] for _ in range(QUEUED)]
    with queued_behind_one_transaction(
        metadata_store, monkeypatch, batches, fail=lambda count: count == 2
    ) as (done, futures):
        outcomes = [future.exception(10) for future in futures]
    assert done.count == 2
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == QUEUED  # each caller raises its own error
    assert all(metadata_store.find(batch[0].key_id) is None for batch in batches)
    metadata_store.add(later := [record()])
    assert metadata_store.find(later[0].key_id) == later[0]
