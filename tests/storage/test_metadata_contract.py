"""The MetadataStore contract, run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from signd.errors import ConfigurationError, InvalidField, KeyExists
from signd.storage.base import KeyRecord, KeystoreRecord
from signd.storage.metadata import MAX_PAGE_SIZE, Migration, SqlMetadataStore
from tests.storage.conftest import MetadataFactory

_counter = itertools.count()
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def record(
    *,
    chain: str = "ethereum",
    custody: str = "enclave",
    labels: Sequence[str] = (),
    key_id: str | None = None,
    address: str | None = None,
    details: Sequence[tuple[str, str]] = (),
) -> KeyRecord:
    n = next(_counter)
    return KeyRecord(
        key_id=key_id or f"key-{n:06d}-{os.urandom(4).hex()}",
        chain=chain,
        address=address or "0x" + os.urandom(20).hex(),
        public_key=b"\x02" + os.urandom(32),
        custody=custody,
        created_at=T0 + timedelta(seconds=n),
        labels=tuple(labels),
        details=tuple(details),
    )


def list_all(store: SqlMetadataStore, limit: int, **filters: Any) -> list[KeyRecord]:
    """Walk every page; check each page's size on the way."""
    found: list[KeyRecord] = []
    cursor: str | None = None
    while True:
        page = store.list(cursor=cursor, limit=limit, **filters)
        found.extend(page.records)
        if page.next_cursor is None:
            assert len(page.records) <= limit
            return found
        assert len(page.records) == limit
        cursor = page.next_cursor


# ----------------------------------------------------------------------------- round trips


def test_round_trip_keeps_every_field(metadata_store: SqlMetadataStore) -> None:
    original = record(
        labels=["zeta", "alpha", "hot"], details=[("path", "m/44'/60'/0'/0/7"), ("a", "")]
    )
    metadata_store.add([original])
    assert metadata_store.find(original.key_id) == original
    found = metadata_store.find(original.address)
    assert found == original
    assert found is not None
    assert found.labels == ("zeta", "alpha", "hot")
    assert found.details == (("path", "m/44'/60'/0'/0/7"), ("a", ""))
    assert found.created_at.tzinfo is not None


def test_created_at_in_another_zone_is_the_same_instant(metadata_store: SqlMetadataStore) -> None:
    eastern = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=8)))
    original = replace(record(), created_at=eastern)
    metadata_store.add([original])
    found = metadata_store.find(original.key_id)
    assert found is not None
    assert found.created_at == eastern
    assert found.created_at.utcoffset() == timedelta(0)


def test_find_missing(metadata_store: SqlMetadataStore) -> None:
    metadata_store.add([record()])
    assert metadata_store.find("nope") is None


def test_find_restricted_to_a_custody_type(metadata_store: SqlMetadataStore) -> None:
    hsm = record(custody="hsm")
    metadata_store.add([hsm])
    assert metadata_store.find(hsm.key_id, custody="hsm") == hsm
    assert metadata_store.find(hsm.address, custody="hsm") == hsm
    assert metadata_store.find(hsm.key_id, custody="enclave") is None


def test_find_prefers_the_key_id_over_an_address(metadata_store: SqlMetadataStore) -> None:
    by_address = record(address="shared-ref")
    by_key_id = record(key_id="shared-ref")
    metadata_store.add([by_address, by_key_id])
    assert metadata_store.find("shared-ref") == by_key_id


def test_find_rejects_an_empty_ref(metadata_store: SqlMetadataStore) -> None:
    with pytest.raises(InvalidField):
        metadata_store.find("")


def test_addresses_are_exact(metadata_store: SqlMetadataStore) -> None:
    original = record(address="0xAbCdEf")
    metadata_store.add([original])
    assert metadata_store.find("0xabcdef") is None
    assert metadata_store.find("0xAbCdEf") == original


def test_add_nothing(metadata_store: SqlMetadataStore) -> None:
    metadata_store.add([])
    assert metadata_store.list().records == []


# ----------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("clash", ["key_id", "address"])
def test_duplicate_in_a_later_batch_inserts_nothing(
    metadata_store: SqlMetadataStore, clash: str
) -> None:
    first = record(labels=["x"])
    metadata_store.add([first])
    fresh = record(labels=["x"])
    duplicate = replace(record(labels=["x"]), **{clash: getattr(first, clash)})
    with pytest.raises(KeyExists, match="address" if clash == "address" else "key id"):
        metadata_store.add([fresh, duplicate])
    assert metadata_store.find(fresh.key_id) is None
    assert metadata_store.find(fresh.address) is None
    assert metadata_store.list().records == [first]
    assert metadata_store.list(label="x").records == [first]


def test_duplicate_within_one_batch(metadata_store: SqlMetadataStore) -> None:
    one = record()
    with pytest.raises(KeyExists):
        metadata_store.add([one, replace(record(), address=one.address)])
    assert metadata_store.list().records == []


def test_store_still_works_after_a_refused_batch(metadata_store: SqlMetadataStore) -> None:
    one = record()
    metadata_store.add([one])
    with pytest.raises(KeyExists):
        metadata_store.add([one])
    two = record()
    metadata_store.add([two])
    assert metadata_store.list().records == [one, two]


@pytest.mark.parametrize(
    "bad",
    [
        {"created_at": datetime(2024, 1, 1)},
        {"labels": ("a", "a")},
        {"labels": ("",)},
        {"key_id": ""},
        {"address": ""},
        {"public_key": "02ab"},
        {"details": (("only-name",),)},
    ],
    ids=["naive-time", "duplicate-label", "empty-label", "empty-key-id", "empty-address",
         "str-public-key", "bad-details"],
)  # fmt: skip
def test_invalid_records_are_refused_before_anything_is_written(
    metadata_store: SqlMetadataStore, bad: dict[str, object]
) -> None:
    good = record()
    with pytest.raises(InvalidField):
        metadata_store.add([good, replace(record(), **bad)])  # type: ignore[arg-type]
    assert metadata_store.list().records == []


# ----------------------------------------------------------------------------- listing


@pytest.fixture
def population(metadata_store: SqlMetadataStore) -> list[KeyRecord]:
    """57 records across custody types, chains and labels, added in several batches."""
    records = [
        record(
            custody=("enclave", "hsm", "kms")[i % 3],
            chain=("ethereum", "bitcoin")[i % 2],
            labels=[
                name for name, every in (("hot", 2), ("vip", 5), ("cold", 7)) if i % every == 0
            ],
        )
        for i in range(57)
    ]
    for start in range(0, len(records), 10):
        metadata_store.add(records[start : start + 10])
    return records


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"custody": "hsm"},
        {"chain": "bitcoin"},
        {"label": "vip"},
        {"label": "cold", "chain": "ethereum"},
        {"custody": "enclave", "chain": "ethereum", "label": "hot"},
        {"label": "no-such-label"},
        {"custody": "no-such-custody"},
    ],
    ids=repr,
)
@pytest.mark.parametrize("limit", [1, 4, 100])
def test_pages_walk_every_match_in_creation_order(
    metadata_store: SqlMetadataStore,
    population: list[KeyRecord],
    filters: dict[str, str],
    limit: int,
) -> None:
    expected = [
        r
        for r in population
        if r.custody == filters.get("custody", r.custody)
        and r.chain == filters.get("chain", r.chain)
        and ("label" not in filters or filters["label"] in r.labels)
    ]
    assert list_all(metadata_store, limit, **filters) == expected


def test_default_limit_and_last_page(metadata_store: SqlMetadataStore) -> None:
    records = [record() for _ in range(101)]
    metadata_store.add(records)
    first = metadata_store.list()
    assert first.records == records[:100]
    assert first.next_cursor is not None
    last = metadata_store.list(cursor=first.next_cursor)
    assert last.records == records[100:]
    assert last.next_cursor is None


def test_exactly_full_page_has_no_next_cursor(metadata_store: SqlMetadataStore) -> None:
    records = [record() for _ in range(5)]
    metadata_store.add(records)
    page = metadata_store.list(limit=5)
    assert page.records == records
    assert page.next_cursor is None


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, True, 2.5])
def test_bad_limits(metadata_store: SqlMetadataStore, limit: int) -> None:
    with pytest.raises(InvalidField) as caught:
        metadata_store.list(limit=limit)
    assert caught.value.field == "limit"


def test_pagination_is_stable_under_concurrent_inserts(metadata_store: SqlMetadataStore) -> None:
    before = [record(labels=["x"]) for _ in range(30)]
    metadata_store.add(before)
    page = metadata_store.list(label="x", limit=7)
    seen = list(page.records)
    added: list[KeyRecord] = []
    while page.next_cursor is not None:
        batch = [record(labels=["x"]), record()]
        metadata_store.add(batch)
        added.append(batch[0])
        page = metadata_store.list(label="x", limit=7, cursor=page.next_cursor)
        seen.extend(page.records)
    assert seen == before + added


def test_pagination_while_threads_insert(metadata_store: SqlMetadataStore) -> None:
    before = [record() for _ in range(40)]
    metadata_store.add(before)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            metadata_store.add([record(), record()])

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(writer) for _ in range(2)]
        try:
            seen = list_all(metadata_store, 3)
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert seen[: len(before)] == before
    assert len({r.key_id for r in seen}) == len(seen)
    assert [r for r in seen if r in before] == before


# ----------------------------------------------------------------------------- cursors


def _flip(text: str, index: int) -> str:
    swapped = "A" if text[index] != "A" else "B"
    return text[:index] + swapped + text[index + 1 :]


def test_tampered_cursors_are_invalid(metadata_store: SqlMetadataStore) -> None:
    metadata_store.add([record() for _ in range(5)])
    cursor = metadata_store.list(limit=2).next_cursor
    assert cursor is not None
    body = cursor.split(".")[0]
    tampered = [_flip(cursor, i) for i in range(len(cursor))] + [
        cursor + "A",
        cursor.replace(".", ""),
        cursor + ".x",
        body,
        "",
        "not a cursor",
        "%%%.%%%",
        "eyJhZnRlciI6IDEwMDB9.AAAAAAAAAAAAAAAAAAAAAA",
    ]
    for bad in tampered:
        with pytest.raises(InvalidField) as caught:
            metadata_store.list(limit=2, cursor=bad)
        assert caught.value.field == "cursor", bad


def test_cursor_is_bound_to_its_filters(metadata_store: SqlMetadataStore) -> None:
    metadata_store.add([record(labels=["x"], chain="bitcoin") for _ in range(5)])
    cursor = metadata_store.list(label="x", limit=2).next_cursor
    assert cursor is not None
    assert len(metadata_store.list(label="x", cursor=cursor).records) == 3
    others: list[dict[str, Any]] = [{}, {"label": "y"}, {"label": "x", "chain": "bitcoin"}]
    for other in others:
        with pytest.raises(InvalidField, match="other filters"):
            metadata_store.list(cursor=cursor, **other)


def test_cursor_from_another_database_is_invalid(
    metadata_store: SqlMetadataStore, tmp_path: object
) -> None:
    from signd.storage.sqlite import SqliteMetadataStore

    assert isinstance(tmp_path, os.PathLike)
    other = SqliteMetadataStore(os.path.join(tmp_path, "other.sqlite"))  # type: ignore[arg-type]
    try:
        other.add([record() for _ in range(3)])
        foreign = other.list(limit=1).next_cursor
        assert foreign is not None
    finally:
        other.close()
    metadata_store.add([record() for _ in range(3)])
    with pytest.raises(InvalidField):
        metadata_store.list(limit=1, cursor=foreign)


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_writers(metadata_store: SqlMetadataStore) -> None:
    batches = [[record(labels=[f"t{t}"]) for _ in range(5)] for t in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(metadata_store.add, batches))
    listed = list_all(metadata_store, 13)
    assert sorted(r.key_id for r in listed) == sorted(r.key_id for b in batches for r in b)
    for batch in batches:
        positions = [listed.index(r) for r in batch]
        assert positions == list(range(positions[0], positions[0] + len(batch)))


def test_concurrent_writers_of_one_address_one_wins(metadata_store: SqlMetadataStore) -> None:
    contenders = [record(address="0xcontended") for _ in range(8)]
    barrier = threading.Barrier(len(contenders))

    def add(candidate: KeyRecord) -> bool:
        barrier.wait()
        try:
            metadata_store.add([candidate, record()])
        except KeyExists:
            return False
        return True

    with ThreadPoolExecutor(len(contenders)) as pool:
        outcomes = list(pool.map(add, contenders))
    assert outcomes.count(True) == 1
    winner = contenders[outcomes.index(True)]
    assert metadata_store.find("0xcontended") == winner
    assert len(metadata_store.list().records) == 2


def test_two_nodes_see_each_others_rows_and_cursors(metadata_factory: MetadataFactory) -> None:
    node_a, node_b = metadata_factory(), metadata_factory()
    from_a = [record(labels=["shared"]) for _ in range(3)]
    node_a.add(from_a)
    from_b = [record(labels=["shared"]) for _ in range(3)]
    node_b.add(from_b)
    assert node_b.find(from_a[0].address) == from_a[0]
    assert node_a.find(from_b[2].key_id) == from_b[2]
    page = node_a.list(label="shared", limit=4)
    assert node_b.list(label="shared", cursor=page.next_cursor).records == from_b[1:]
    with pytest.raises(KeyExists):
        node_b.add([from_a[1]])


# ----------------------------------------------------------------------------- keystores


def test_keystore_records_grow_and_are_never_taken_over_while_they_count_keys(
    metadata_factory: MetadataFactory,
) -> None:
    """A keystore's record keeps the largest count seen; another keystore at the same path
    replaces it only while it counts no key. Another node on the database sees the same."""
    node_a, node_b = metadata_factory(), metadata_factory()
    where = "/var/lib/signd/wallet.data"
    assert node_a.keystore_record(where) is None
    first = KeystoreRecord(where, "keystore-a", 0)
    assert node_a.record_keystore(first) == first
    assert node_b.record_keystore(KeystoreRecord(where, "keystore-b", 2)) == KeystoreRecord(
        where, "keystore-b", 2
    )  # the record counted no key: the new keystore takes the path
    grown = KeystoreRecord(where, "keystore-b", 5)
    assert node_a.record_keystore(grown) == grown
    assert node_b.record_keystore(KeystoreRecord(where, "keystore-b", 3)) == grown  # older view
    assert node_a.record_keystore(KeystoreRecord(where, "keystore-c", 9)) == grown
    assert node_b.keystore_record(where) == grown
    assert node_a.keystore_record("/elsewhere/wallet.data") is None
    assert node_a.list().records == []  # not a key record


def test_keystore_records_from_concurrent_writers_keep_the_largest_count(
    metadata_factory: MetadataFactory,
) -> None:
    nodes = [metadata_factory() for _ in range(2)]
    where = "/srv/wallet.data"

    def seen(count: int) -> KeystoreRecord:
        return nodes[count % 2].record_keystore(KeystoreRecord(where, "keystore-a", count))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(seen, range(40)))
    assert nodes[0].keystore_record(where) == KeystoreRecord(where, "keystore-a", 39)


@pytest.mark.parametrize(
    "fields",
    [
        {"location": "", "keystore_id": "k", "key_count": 0},
        {"location": "/w", "keystore_id": "", "key_count": 0},
        {"location": "/w", "keystore_id": "k", "key_count": -1},
        {"location": "/w", "keystore_id": "k", "key_count": True},
    ],
)
def test_bad_keystore_records_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidField):
        KeystoreRecord(**fields)


# ----------------------------------------------------------------------------- migrations


def _migration_rows(store: SqlMetadataStore) -> list[tuple[int, str]]:
    with store._transaction(write=False) as cursor:
        cursor.execute("SELECT version, name FROM schema_migrations ORDER BY version", ())
        return [(int(v), n) for v, n in cursor.fetchall()]


def test_migrations_applied_once_and_reopen_is_idempotent(
    metadata_factory: MetadataFactory,
) -> None:
    first = metadata_factory()
    expected = [(m.version, m.name) for m in first.migrations]
    assert _migration_rows(first) == expected
    kept = record()
    first.add([kept])
    first.close()
    for _ in range(2):
        again = metadata_factory()
        assert _migration_rows(again) == expected
        assert again.schema_version() == expected[-1][0]
        assert again.find(kept.key_id) == kept


def test_a_new_migration_is_applied_on_reopen(metadata_factory: MetadataFactory) -> None:
    base = metadata_factory()
    kept = record()
    base.add([kept])

    class Upgraded(metadata_factory.store_class):  # type: ignore[name-defined,misc]
        migrations = (
            *metadata_factory.store_class.migrations,
            Migration(99, "audit table", ("CREATE TABLE audit_probe (id INTEGER)",)),
        )

    upgraded = metadata_factory(Upgraded)
    assert upgraded.schema_version() == 99
    assert _migration_rows(upgraded)[-1] == (99, "audit table")
    assert upgraded.find(kept.key_id) == kept
    metadata_factory(Upgraded)
    assert [v for v, _ in _migration_rows(upgraded)].count(99) == 1


def test_a_database_newer_than_the_code_is_refused(metadata_factory: MetadataFactory) -> None:
    store = metadata_factory()
    with store._transaction(write=True) as cursor:
        cursor.execute(
            store._sql("INSERT INTO schema_migrations VALUES (?, ?, ?)"), (1000, "future", "now")
        )
    with pytest.raises(ConfigurationError, match="1000"):
        metadata_factory()


def test_nodes_opening_a_fresh_database_at_once(metadata_factory: MetadataFactory) -> None:
    nodes = 4
    barrier = threading.Barrier(nodes)

    def open_node() -> SqlMetadataStore:
        barrier.wait()
        return metadata_factory()

    with ThreadPoolExecutor(nodes) as pool:
        stores = list(pool.map(lambda _: open_node(), range(nodes)))
    expected = [(m.version, m.name) for m in stores[0].migrations]
    assert _migration_rows(stores[0]) == expected
    stores[0].add([record()])
    cursor = stores[0].list(limit=1).next_cursor
    stores[1].add([record()])
    assert all(len(s.list(limit=1, cursor=cursor).records) == 1 for s in stores)


def test_check_health(metadata_store: SqlMetadataStore) -> None:
    metadata_store.check_health()
