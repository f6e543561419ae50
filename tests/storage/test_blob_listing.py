"""Listing and stat of blob stores (filesystem and S3 on moto): names, sizes and write times,
never a byte of a blob; paging; a store that is down or not mounted is DependencyUnavailable."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from signd.errors import DependencyUnavailable
from signd.storage.base import BlobStat, BlobStore
from signd.storage.blobs import MARKER, FilesystemBlobStore
from signd.storage.s3 import S3BlobStore
from tests.fixtures.servers import MotoServer, free_port


def listed(store: BlobStore, prefix: str = "") -> dict[str, int]:
    return {blob.name: blob.size for blob in store.list_blobs(prefix)}


def test_an_empty_store_lists_nothing(blob_store: BlobStore) -> None:
    assert listed(blob_store) == {}


def test_lists_every_blob_with_its_size_and_write_time(blob_store: BlobStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)  # S3 keeps whole seconds
    sizes = {f"enclave-batch-{n}": 100 * n + 1 for n in range(7)} | {"other": 3}
    for name, size in sizes.items():
        blob_store.put(name, os.urandom(size))
    after = datetime.now(UTC) + timedelta(seconds=5)

    blobs = list(blob_store.list_blobs())
    assert {blob.name: blob.size for blob in blobs} == sizes
    assert len(blobs) == len(sizes)
    for blob in blobs:
        assert blob.modified.tzinfo is not None
        assert before <= blob.modified <= after
    assert listed(blob_store, "enclave-") == {n: s for n, s in sizes.items() if n != "other"}
    assert listed(blob_store, "enclave-batch-3") == {"enclave-batch-3": 301}
    assert listed(blob_store, "nothing-") == {}


def test_stat_gives_size_and_time_or_none(blob_store: BlobStore) -> None:
    blob_store.put("enclave-batch-a", b"x" * 261)
    found = blob_store.stat("enclave-batch-a")
    assert isinstance(found, BlobStat)
    assert (found.name, found.size) == ("enclave-batch-a", 261)
    assert abs(found.modified - datetime.now(UTC)) < timedelta(seconds=10)
    assert blob_store.stat("enclave-batch-b") is None


def test_a_deleted_blob_is_no_longer_listed(blob_store: BlobStore) -> None:
    blob_store.put("a", b"1")
    blob_store.put("b", b"22")
    blob_store.delete("a")
    assert listed(blob_store) == {"b": 2}
    assert blob_store.stat("a") is None


# --------------------------------------------------------------------------- filesystem


def test_filesystem_listing_skips_what_is_not_a_blob(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("enclave-batch-a", b"abc")
    shard = store.path_of("enclave-batch-a").parent
    (shard / ".enclave-batch-b.1234.tmp").write_bytes(b"half written")  # a crash leftover
    (shard / "enclave-batch-misplaced").write_bytes(b"not where get would look")
    (shard / "enclave-batch-folder").mkdir()
    (tmp_path / "blobs" / "enclave-batch-at-root").write_bytes(b"not in a shard")
    assert listed(store) == {"enclave-batch-a": 3}


def test_filesystem_time_is_the_file_mtime(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("old", b"x")
    written = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    os.utime(store.path_of("old"), (written.timestamp(), written.timestamp()))
    [blob] = store.list_blobs()
    assert blob.modified == written
    stat = store.stat("old")
    assert stat is not None
    assert stat.modified == written


def test_an_unmounted_filesystem_store_is_unavailable_not_empty(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("a", b"x")
    (tmp_path / "blobs" / MARKER).unlink()
    with pytest.raises(DependencyUnavailable, match="marker"):
        list(store.list_blobs())
    with pytest.raises(DependencyUnavailable, match="marker"):
        store.stat("missing")


# --------------------------------------------------------------------------- S3


def _store(server: MotoServer, bucket: str, prefix: str, **options: object) -> S3BlobStore:
    return S3BlobStore(
        bucket,
        prefix,
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        **options,  # type: ignore[arg-type]
    )


def test_s3_listing_pages_through_every_object(moto_server: MotoServer, s3_bucket: str) -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    requests: list[str] = []
    client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: requests.append("list")
    )
    store = S3BlobStore(s3_bucket, "signd/", client=client, list_page_size=2)
    names = {f"enclave-batch-{n:02d}": n + 1 for n in range(7)}
    for name, size in names.items():
        store.put(name, b"s" * size)
    assert listed(store) == names
    assert len(requests) == 4  # 2 + 2 + 2 + 1
    client.close()


def test_s3_lists_only_its_prefix_and_no_folders(moto_server: MotoServer, s3_bucket: str) -> None:
    store = _store(moto_server, s3_bucket, "signd/")
    store.put("enclave-batch-a", b"abc")
    raw = moto_server.client("s3")
    raw.put_object(Bucket=s3_bucket, Key="other/enclave-batch-b", Body=b"elsewhere")
    raw.put_object(Bucket=s3_bucket, Key="signd/sub/enclave-batch-c", Body=b"a folder")
    raw.put_object(Bucket=s3_bucket, Key="signd-enclave-batch-d", Body=b"no slash")
    assert listed(store) == {"enclave-batch-a": 3}


def test_s3_down_is_unavailable(moto_server: MotoServer) -> None:
    store = S3BlobStore(
        "bucket",
        "signd/",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        timeout=1,
        max_attempts=1,
    )
    with pytest.raises(DependencyUnavailable, match="cannot list the blobs"):
        list(store.list_blobs())
    with pytest.raises(DependencyUnavailable, match="cannot stat blob"):
        store.stat("enclave-batch-a")
    store.close()


def test_s3_missing_bucket_is_unavailable(moto_server: MotoServer) -> None:
    store = _store(moto_server, "no-such-bucket-here", "signd/")
    with pytest.raises(DependencyUnavailable, match="NoSuchBucket"):
        list(store.list_blobs())
    store.close()
