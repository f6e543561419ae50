"""MetadataStore.find_by_detail on SQLite and PostgreSQL (the SQL prefilter) and on the
base class's paging default (the in-memory fake)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.errors import InvalidField
from signd.storage.base import MetadataStore
from signd.storage.postgres import PostgresMetadataStore
from signd.storage.sqlite import SqliteMetadataStore
from tests.enclave.fakes import MemoryMetadataStore
from tests.storage.test_metadata_contract import record

BATCH = "enclave-batch-0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgres", "default"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    """Each SQL store, and the base class's own implementation (on the in-memory fake)."""
    found: MetadataStore
    if request.param == "sqlite":
        found = SqliteMetadataStore(tmp_path / "meta.sqlite")
    elif request.param == "postgres":
        found = PostgresMetadataStore(request.getfixturevalue("postgres_schema_dsn"))
    else:
        found = MemoryMetadataStore()
    yield found
    found.close()


def test_exact_and_prefix(store: MetadataStore) -> None:
    first = record(details=[("blob", f"{BATCH}@0+261")])
    second = record(details=[("blob", f"{BATCH}@261+261"), ("sealed_labels", "true")])
    store.add([first, second])
    assert store.find_by_detail("blob", f"{BATCH}@261+261") == second
    assert store.find_by_detail("blob", BATCH) is None  # no record names the bare blob
    assert store.find_by_detail("blob", BATCH, prefix=True) == first  # first created
    assert store.find_by_detail("blob", BATCH + "@2", prefix=True) == second
    assert store.find_by_detail("blob", "enclave-batch-ffff", prefix=True) is None


def test_only_the_named_detail_counts(store: MetadataStore) -> None:
    store.add([record(details=[("cka_label", BATCH), ("blob", "enclave-other")])])
    assert store.find_by_detail("blob", BATCH, prefix=True) is None
    assert store.find_by_detail("cka_label", BATCH) is not None


def test_a_value_inside_another_is_no_match(store: MetadataStore) -> None:
    store.add([record(details=[("blob", f"x-{BATCH}@0+1")])])
    assert store.find_by_detail("blob", BATCH, prefix=True) is None


def test_custody_filter(store: MetadataStore) -> None:
    hsm = record(custody="hsm", details=[("blob", BATCH)])
    store.add([hsm])
    assert store.find_by_detail("blob", BATCH, custody="enclave") is None
    assert store.find_by_detail("blob", BATCH, custody="hsm") == hsm
    assert store.find_by_detail("blob", BATCH) == hsm


@pytest.mark.parametrize(
    "value",
    ["a%b", "a_b", "a\\b", 'a"b', "ÄÖ-键", "A_B"],
    ids=["percent", "under", "bs", "q", "u", "A"],
)
def test_like_wildcards_and_escapes_are_plain_text(store: MetadataStore, value: str) -> None:
    """``%`` and ``_`` match only themselves, quotes and non-ASCII are found, and the case
    counts (SQLite's LIKE ignores it: the rows it lets through are checked again)."""
    decoys = ["aXb", "a", "ab", "a\\\\b", "äö-键", "a_b" if value == "A_B" else "A_B"]
    store.add([record(details=[("blob", decoy)]) for decoy in decoys if decoy != value])
    assert store.find_by_detail("blob", value) is None
    assert store.find_by_detail("blob", value, prefix=True) is None
    wanted = record(details=[("blob", value + "@9+9")])
    store.add([wanted])
    assert store.find_by_detail("blob", value, prefix=True) == wanted
    assert store.find_by_detail("blob", value) is None


def test_pages_past_rows_that_only_look_alike(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows the prefilter lets through but that do not match fill whole pages; the match
    after them is still found."""
    monkeypatch.setattr("signd.storage.base.DETAIL_SCAN_PAGE", 2)
    monkeypatch.setattr("signd.storage.metadata.DETAIL_SCAN_PAGE", 2)
    store.add([record(details=[("label", BATCH)]) for _ in range(5)])
    wanted = record(details=[("blob", BATCH)])
    store.add([wanted])
    assert store.find_by_detail("blob", BATCH) == wanted


@pytest.mark.parametrize(("name", "value"), [("", "v"), ("blob", ""), (None, "v"), ("blob", 5)])
def test_bad_queries_are_refused(store: MetadataStore, name: object, value: object) -> None:
    with pytest.raises(InvalidField):
        store.find_by_detail(name, value)  # type: ignore[arg-type]
