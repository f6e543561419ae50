"""Quarantine of blob stores (filesystem and S3 on moto): a quarantined blob is out of reach
of every read and listing but kept byte for byte where an operator can move it back by hand;
a move that stopped half way is finished; nothing is ever replaced; faults are 503s."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.stub import Stubber

from signd.errors import DependencyUnavailable, KeyExists, KeyNotFound
from signd.storage import blobs as filesystem_blobs
from signd.storage.base import BlobStore
from signd.storage.blobs import MARKER, QUARANTINE_FOLDER, FilesystemBlobStore
from signd.storage.s3 import S3BlobStore
from tests.fixtures.servers import MotoServer, free_port

NAME = "enclave-batch-" + "ab" * 16


def listed(store: BlobStore, prefix: str = "") -> dict[str, int]:
    return {blob.name: blob.size for blob in store.list_blobs(prefix)}


def held(store: BlobStore) -> dict[str, int]:
    return {blob.name: blob.size for blob in store.list_quarantined()}


@dataclass
class Operator:
    """What an operator does by hand, outside signd: ``mv``, ``ln``, ``aws s3 cp/mv``."""

    store: BlobStore
    s3: Any = None

    def read(self, where: str) -> bytes:
        if self.s3 is None:
            return Path(where).read_bytes()
        bucket, key = self._split(where)
        body: bytes = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def move_back(self, where: str, name: str) -> None:
        if isinstance(self.store, FilesystemBlobStore):
            os.rename(where, self.store.path_of(name))
            return
        assert isinstance(self.store, S3BlobStore)
        bucket, key = self._split(where)
        self.s3.copy_object(
            Bucket=bucket, Key=self.store.prefix + name, CopySource={"Bucket": bucket, "Key": key}
        )
        self.s3.delete_object(Bucket=bucket, Key=key)

    def copy_to_quarantine(self, name: str) -> None:
        """The first half of a move: the blob under its quarantine name, and still in place."""
        if isinstance(self.store, FilesystemBlobStore):
            target = self.store.root / QUARANTINE_FOLDER / name
            target.parent.mkdir(exist_ok=True)
            os.link(self.store.path_of(name), target)
            return
        assert isinstance(self.store, S3BlobStore)
        bucket, prefix = self.store.bucket, self.store.prefix
        self.s3.copy_object(
            Bucket=bucket,
            Key=f"{prefix}quarantine/{name}",
            CopySource={"Bucket": bucket, "Key": prefix + name},
        )

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        assert parts.scheme == "s3"
        return parts.netloc, parts.path.lstrip("/")


@pytest.fixture
def operator(blob_store: BlobStore, request: pytest.FixtureRequest) -> Operator:
    if isinstance(blob_store, S3BlobStore):
        server: MotoServer = request.getfixturevalue("moto_server")
        return Operator(blob_store, server.client("s3"))
    return Operator(blob_store)


# --------------------------------------------------------------------------- both stores


def test_a_quarantined_blob_is_out_of_reach_but_whole(
    blob_store: BlobStore, operator: Operator
) -> None:
    data = os.urandom(700)
    blob_store.put(NAME, data)
    blob_store.put("enclave-batch-other", b"kept")

    where = blob_store.quarantine(NAME)
    assert operator.read(where) == data
    with pytest.raises(KeyNotFound):
        blob_store.get(NAME)
    with pytest.raises(KeyNotFound):
        blob_store.get_range(NAME, 0, 10)
    assert blob_store.stat(NAME) is None
    assert listed(blob_store) == listed(blob_store, "enclave-") == {"enclave-batch-other": 4}
    assert held(blob_store) == {NAME: 700}
    assert blob_store.get("enclave-batch-other") == b"kept"

    operator.move_back(where, NAME)
    assert blob_store.get(NAME) == data
    assert listed(blob_store)[NAME] == 700
    assert held(blob_store) == {}


def test_where_it_goes(blob_store: BlobStore) -> None:
    blob_store.put(NAME, b"x")
    where = blob_store.quarantine(NAME)
    if isinstance(blob_store, FilesystemBlobStore):
        assert where == str(blob_store.root / "quarantine" / NAME)
    else:
        assert isinstance(blob_store, S3BlobStore)
        assert where == f"s3://{blob_store.bucket}/blobs/quarantine/{NAME}"


def test_a_missing_blob_is_key_not_found(blob_store: BlobStore) -> None:
    with pytest.raises(KeyNotFound):
        blob_store.quarantine(NAME)
    blob_store.put(NAME, b"x")
    blob_store.quarantine(NAME)
    with pytest.raises(KeyNotFound):  # already moved
        blob_store.quarantine(NAME)
    assert held(blob_store) == {NAME: 1}


def test_another_blob_of_that_name_in_quarantine_is_never_replaced(
    blob_store: BlobStore, operator: Operator
) -> None:
    first, second = os.urandom(64), os.urandom(64)
    blob_store.put(NAME, first)
    where = blob_store.quarantine(NAME)
    blob_store.put(NAME, second)  # the same name stored again, other bytes

    with pytest.raises(KeyExists):
        blob_store.quarantine(NAME)
    assert blob_store.get(NAME) == second
    assert operator.read(where) == first


def test_a_move_stopped_half_way_is_finished(blob_store: BlobStore, operator: Operator) -> None:
    data = os.urandom(300)
    blob_store.put(NAME, data)
    operator.copy_to_quarantine(NAME)
    assert blob_store.get(NAME) == data  # both names hold it, as a crash leaves it

    where = blob_store.quarantine(NAME)
    assert operator.read(where) == data
    assert blob_store.stat(NAME) is None
    assert held(blob_store) == {NAME: 300}


def test_an_empty_quarantine_lists_nothing(blob_store: BlobStore) -> None:
    blob_store.put(NAME, b"x")
    assert held(blob_store) == {}


# --------------------------------------------------------------------------- filesystem


def test_filesystem_move_is_link_sync_unlink_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put(NAME, b"sealed")
    source, target = store.path_of(NAME), store.root / QUARANTINE_FOLDER / NAME
    steps: list[tuple[str, Path]] = []
    real_link, real_unlink, real_sync = os.link, os.unlink, filesystem_blobs.files.sync_folder

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        steps.append(("link", Path(dst)))
        real_link(src, dst, **kwargs)

    def unlink(path: Any, **kwargs: Any) -> None:
        steps.append(("unlink", Path(path)))
        real_unlink(path, **kwargs)

    def sync(folder: Path) -> None:
        steps.append(("sync", Path(folder)))
        real_sync(folder)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(filesystem_blobs.files, "sync_folder", sync)
    store.quarantine(NAME)
    assert steps[-4:] == [
        ("link", target),
        ("sync", target.parent),
        ("unlink", source),
        ("sync", source.parent),
    ]
    assert ("sync", store.root) in steps[:-4]  # the new quarantine folder made durable


def test_filesystem_crash_before_the_unlink_then_a_second_call_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put(NAME, b"sealed")
    target = store.root / QUARANTINE_FOLDER / NAME

    def failing_unlink(path: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", failing_unlink)
        with pytest.raises(DependencyUnavailable, match="cannot quarantine blob"):
            store.quarantine(NAME)
    assert os.path.samefile(store.path_of(NAME), target)

    assert store.quarantine(NAME) == str(target)
    assert not store.path_of(NAME).exists()
    assert target.read_bytes() == b"sealed"


def test_filesystem_quarantine_survives_a_reopen_and_is_not_a_shard(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put(NAME, b"sealed")
    store.quarantine(NAME)
    reopened = FilesystemBlobStore(tmp_path / "blobs")
    assert listed(reopened) == {}
    assert held(reopened) == {NAME: 6}
    (reopened.root / QUARANTINE_FOLDER / ".half.tmp").write_bytes(b"not a blob")
    (reopened.root / QUARANTINE_FOLDER / "a-folder").mkdir()
    assert held(reopened) == {NAME: 6}


def test_filesystem_unmounted_is_unavailable(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put(NAME, b"x")
    (tmp_path / "blobs" / MARKER).unlink()
    with pytest.raises(DependencyUnavailable, match="marker"):
        store.quarantine(NAME)
    with pytest.raises(DependencyUnavailable, match="marker"):
        list(store.list_quarantined())
    assert store.path_of(NAME).read_bytes() == b"x"


def test_filesystem_unwritable_quarantine_is_unavailable(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put(NAME, b"x")
    (store.root / QUARANTINE_FOLDER).write_bytes(b"a file where the folder should be")
    with pytest.raises(DependencyUnavailable, match="cannot quarantine blob"):
        store.quarantine(NAME)
    assert store.get(NAME) == b"x"


# --------------------------------------------------------------------------- S3


def test_s3_quarantine_is_not_listed_without_a_prefix(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    store = S3BlobStore(s3_bucket, "", endpoint_url=moto_server.endpoint_url, region="us-east-1")
    store.put(NAME, b"sealed")
    assert store.quarantine(NAME) == f"s3://{s3_bucket}/quarantine/{NAME}"
    assert listed(store) == {}
    assert held(store) == {NAME: 6}
    store.close()


def test_s3_down_is_unavailable() -> None:
    store = S3BlobStore(
        "bucket",
        "signd/",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        timeout=1,
        max_attempts=1,
    )
    with pytest.raises(DependencyUnavailable, match="cannot quarantine blob"):
        store.quarantine(NAME)
    with pytest.raises(DependencyUnavailable, match="cannot list the quarantine"):
        list(store.list_quarantined())
    store.close()


def _stubbed_store() -> tuple[S3BlobStore, Stubber]:
    client = boto3.session.Session().client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return S3BlobStore("bucket", "p/", client=client), Stubber(client)


SOURCE = {"Bucket": "bucket", "Key": f"p/{NAME}"}
TARGET = {"Bucket": "bucket", "Key": f"p/quarantine/{NAME}"}
COPY = {**TARGET, "CopySource": SOURCE}
HEAD = {"ContentLength": 6, "ETag": '"e1"'}


def test_s3_copy_refused_by_the_endpoint_keeps_the_blob() -> None:
    """If-None-Match on the copy: another writer got there between the HEAD and the copy."""
    store, stub = _stubbed_store()
    stub.add_response("head_object", HEAD, expected_params=SOURCE)
    stub.add_client_error("head_object", "404", http_status_code=404, expected_params=TARGET)
    stub.add_client_error("copy_object", "PreconditionFailed", http_status_code=412,
                          expected_params={**COPY, "IfNoneMatch": "*"})  # fmt: skip
    with stub:
        with pytest.raises(KeyExists):
            store.quarantine(NAME)
        stub.assert_no_pending_responses()  # and no delete_object was sent


def test_s3_endpoint_without_conditional_copy_copies_plainly() -> None:
    store, stub = _stubbed_store()
    stub.add_response("head_object", HEAD, expected_params=SOURCE)
    stub.add_client_error("head_object", "404", http_status_code=404, expected_params=TARGET)
    stub.add_client_error("copy_object", "NotImplemented", http_status_code=501,
                          expected_params={**COPY, "IfNoneMatch": "*"})  # fmt: skip
    stub.add_response("copy_object", {}, expected_params=COPY)
    stub.add_response("delete_object", {}, expected_params=SOURCE)
    with stub:
        assert store.quarantine(NAME) == f"s3://bucket/p/quarantine/{NAME}"
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("operation", "code", "status", "expected"),
    [
        ("copy_object", "NoSuchKey", 404, KeyNotFound),
        ("copy_object", "AccessDenied", 403, DependencyUnavailable),
        ("delete_object", "AccessDenied", 403, DependencyUnavailable),
    ],
)
def test_s3_error_mapping(
    operation: str, code: str, status: int, expected: type[Exception]
) -> None:
    store, stub = _stubbed_store()
    stub.add_response("head_object", HEAD, expected_params=SOURCE)
    stub.add_client_error("head_object", "404", http_status_code=404, expected_params=TARGET)
    if operation == "delete_object":
        stub.add_response("copy_object", {}, expected_params={**COPY, "IfNoneMatch": "*"})
    stub.add_client_error(operation, code, http_status_code=status)
    with stub, pytest.raises(expected):
        store.quarantine(NAME)
