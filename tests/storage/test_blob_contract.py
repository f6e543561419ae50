"""The BlobStore contract, run against the filesystem store and the S3 store (moto)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from signd.errors import InvalidField, KeyExists, KeyNotFound, SigndError
from signd.storage.base import BlobStore
from signd.storage.blobs import MAX_NAME_BYTES

BAD_NAMES = [
    "",
    ".",
    "..",
    "../escape",
    "a/../../b",
    "a/b",
    "/abs",
    "a\\b",
    "..hidden",
    ".hidden",
    "a..b",
    "tab\tname",
    "new\nline",
    "nul\x00byte",
    "del\x7f",
    "x" * (MAX_NAME_BYTES + 1),
    "é" * (MAX_NAME_BYTES // 2 + 1),
]

GOOD_NAMES = ["k", "key-1_A.enc", "with space", "ünïcödé-键", "x" * MAX_NAME_BYTES, "a.b.c"]


def test_round_trip(blob_store: BlobStore) -> None:
    data = os.urandom(4096)
    blob_store.put("key-1.enc", data)
    assert blob_store.get("key-1.enc") == data


@pytest.mark.parametrize(
    "data", [b"", b"\x00", bytes(range(256)) * 4096], ids=["empty", "nul", "1MiB"]
)
def test_round_trip_sizes(blob_store: BlobStore, data: bytes) -> None:
    blob_store.put("blob", data)
    assert blob_store.get("blob") == data


def test_accepts_memoryview_and_bytearray(blob_store: BlobStore) -> None:
    blob_store.put("a", bytearray(b"abc"))  # type: ignore[arg-type]
    blob_store.put("b", memoryview(b"def"))  # type: ignore[arg-type]
    assert (blob_store.get("a"), blob_store.get("b")) == (b"abc", b"def")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_unusual_but_valid_names(blob_store: BlobStore, name: str) -> None:
    blob_store.put(name, name.encode())
    assert blob_store.get(name) == name.encode()


def test_put_refuses_an_existing_name_and_keeps_the_first(blob_store: BlobStore) -> None:
    blob_store.put("k", b"first")
    with pytest.raises(KeyExists):
        blob_store.put("k", b"second")
    assert blob_store.get("k") == b"first"


def test_get_missing(blob_store: BlobStore) -> None:
    with pytest.raises(KeyNotFound):
        blob_store.get("nothing-here")


def test_delete(blob_store: BlobStore) -> None:
    blob_store.put("k", b"x")
    blob_store.put("other", b"y")
    blob_store.delete("k")
    with pytest.raises(KeyNotFound):
        blob_store.get("k")
    assert blob_store.get("other") == b"y"
    blob_store.put("k", b"again")
    assert blob_store.get("k") == b"again"


def test_delete_missing_is_quiet(blob_store: BlobStore) -> None:
    blob_store.delete("never-written")


def test_names_are_distinct(blob_store: BlobStore) -> None:
    names = ["a", "A", "a.", "a b", "ab"]
    for name in names:
        blob_store.put(name, name.encode())
    assert [blob_store.get(name) for name in names] == [name.encode() for name in names]


def test_bad_names_are_refused(blob_store: BlobStore) -> None:
    calls: dict[str, Callable[[str], object]] = {
        "put": lambda name: blob_store.put(name, b"x"),
        "get": blob_store.get,
        "delete": blob_store.delete,
    }
    for name in BAD_NAMES:
        for call_name, call in calls.items():
            with pytest.raises(InvalidField) as caught:
                call(name)
            assert caught.value.field == "name", (call_name, name)


@pytest.mark.parametrize("name", [None, 5, b"bytes"], ids=repr)
def test_non_string_names_are_refused(blob_store: BlobStore, name: object) -> None:
    with pytest.raises(InvalidField):
        blob_store.put(name, b"x")  # type: ignore[arg-type]


def test_concurrent_writers_of_distinct_names(blob_store: BlobStore) -> None:
    blobs = {f"blob-{i}": os.urandom(64) for i in range(64)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: blob_store.put(*item), blobs.items()))
    assert {name: blob_store.get(name) for name in blobs} == blobs


def test_concurrent_writers_of_one_name_one_wins(
    blob_store: BlobStore, request: pytest.FixtureRequest
) -> None:
    if "s3" in request.node.callspec.id:
        pytest.skip("moto checks If-None-Match without a lock; real S3 decides atomically")
    writers = 8
    barrier = threading.Barrier(writers)
    outcomes: list[bytes | SigndError] = []

    def write(index: int) -> None:
        data = f"writer-{index}".encode()
        barrier.wait()
        try:
            blob_store.put("contended", data)
            outcomes.append(data)
        except KeyExists as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if isinstance(o, bytes)]
    assert len(winners) == 1
    assert all(isinstance(o, KeyExists) for o in outcomes if o not in winners)
    assert blob_store.get("contended") == winners[0]


def test_check_health(blob_store: BlobStore) -> None:
    blob_store.check_health()


def test_get_range_reads_exactly_the_slice(blob_store: BlobStore) -> None:
    data = bytes(range(256)) * 4
    blob_store.put("ranged", data)
    for offset, length in [(0, 1), (0, 1024), (100, 37), (1023, 1), (512, 512)]:
        assert blob_store.get_range("ranged", offset, length) == data[offset : offset + length]


def test_get_range_out_of_bounds_or_missing_is_key_not_found(blob_store: BlobStore) -> None:
    blob_store.put("short", b"0123456789")
    for offset, length in [(5, 6), (10, 1), (100, 5)]:
        with pytest.raises(KeyNotFound):
            blob_store.get_range("short", offset, length)
    with pytest.raises(KeyNotFound):
        blob_store.get_range("absent", 0, 1)


@pytest.mark.parametrize(("offset", "length"), [(-1, 5), (0, 0), (0, -3), (0, (1 << 20) + 1)])
def test_get_range_refuses_bad_ranges(blob_store: BlobStore, offset: int, length: int) -> None:
    blob_store.put("any", b"data")
    with pytest.raises(InvalidField):
        blob_store.get_range("any", offset, length)
