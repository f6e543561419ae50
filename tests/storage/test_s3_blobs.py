"""What only the S3 blob store promises: prefixes, conditional writes, timeouts, recovery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from signd.errors import DependencyUnavailable, KeyExists, KeyNotFound
from signd.storage.s3 import S3BlobStore
from tests.fixtures.servers import MotoServer, moto_server


def make_store(server: MotoServer, bucket: str, prefix: str = "", **options: Any) -> S3BlobStore:
    return S3BlobStore(
        bucket, prefix, endpoint_url=server.endpoint_url, region="us-east-1", **options
    )


def test_objects_live_under_the_prefix(moto_server: MotoServer, s3_bucket: str) -> None:
    store = make_store(moto_server, s3_bucket, "tenant-a")
    store.put("k", b"data")
    listing = moto_server.client("s3").list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in listing["Contents"]] == ["tenant-a/k"]


def test_prefixes_keep_stores_apart(moto_server: MotoServer, s3_bucket: str) -> None:
    first, second = (
        make_store(moto_server, s3_bucket, "a/"),
        make_store(moto_server, s3_bucket, "b/"),
    )
    first.put("k", b"one")
    second.put("k", b"two")
    assert (first.get("k"), second.get("k")) == (b"one", b"two")
    first.put("only-in-first", b"x")
    with pytest.raises(KeyNotFound):
        second.get("only-in-first")


def test_head_then_put_mode(moto_server: MotoServer, s3_bucket: str) -> None:
    store = make_store(moto_server, s3_bucket, conditional_put=False)
    store.put("k", b"first")
    with pytest.raises(KeyExists):
        store.put("k", b"second")
    assert store.get("k") == b"first"


def _stubbed_store() -> tuple[S3BlobStore, Stubber]:
    client = boto3.session.Session().client(
        "s3",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return S3BlobStore("bucket", "p/", client=client), Stubber(client)


def test_endpoint_without_conditional_writes_falls_back_to_head_then_put() -> None:
    store, stub = _stubbed_store()
    put = {"Bucket": "bucket", "Key": "p/k", "Body": b"data"}
    stub.add_client_error("put_object", "NotImplemented", http_status_code=501,
                          expected_params={**put, "IfNoneMatch": "*"})  # fmt: skip
    stub.add_client_error("head_object", "404", http_status_code=404,
                          expected_params={"Bucket": "bucket", "Key": "p/k"})  # fmt: skip
    stub.add_response("put_object", {}, expected_params=put)
    stub.add_response("head_object", {}, expected_params={"Bucket": "bucket", "Key": "p/k2"})
    with stub:
        store.put("k", b"data")
        with pytest.raises(KeyExists):
            store.put("k2", b"data")
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("PreconditionFailed", 412, KeyExists),
        ("ConditionalRequestConflict", 409, KeyExists),
        ("AccessDenied", 403, DependencyUnavailable),
        ("InternalError", 500, DependencyUnavailable),
    ],
)
def test_put_error_mapping(code: str, status: int, expected: type[Exception]) -> None:
    store, stub = _stubbed_store()
    stub.add_client_error("put_object", code, http_status_code=status)
    with stub, pytest.raises(expected):
        store.put("k", b"data")


def test_missing_bucket_is_dependency_unavailable(moto_server: MotoServer) -> None:
    store = make_store(moto_server, "no-such-bucket-here")
    with pytest.raises(DependencyUnavailable, match=r"no-such-bucket-here.*NoSuchBucket"):
        store.get("k")
    with pytest.raises(DependencyUnavailable):
        store.check_health()


@pytest.fixture
def private_moto() -> Iterator[MotoServer]:
    """A moto server of this test's own, free to stop and pause."""
    with moto_server() as server:
        yield server


def test_endpoint_down_then_back(private_moto: MotoServer) -> None:
    private_moto.client("s3").create_bucket(Bucket="signd-faults")
    store = make_store(private_moto, "signd-faults", timeout=1, max_attempts=2)
    store.put("before", b"x")
    private_moto.stop()
    started = time.monotonic()
    for call in (lambda: store.get("before"), lambda: store.put("k", b"x"), store.check_health):
        with pytest.raises(DependencyUnavailable, match="EndpointConnectionError"):
            call()
    assert time.monotonic() - started < 10
    private_moto.start()
    private_moto.client("s3").create_bucket(Bucket="signd-faults")
    store.put("after", b"y")
    assert store.get("after") == b"y"


def test_endpoint_stuck_times_out_then_recovers(private_moto: MotoServer) -> None:
    private_moto.client("s3").create_bucket(Bucket="signd-faults")
    store = make_store(private_moto, "signd-faults", timeout=1, max_attempts=1)
    store.put("k", b"x")
    private_moto.pause()
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="ReadTimeoutError"):
            store.get("k")
        assert time.monotonic() - started < 3
    finally:
        private_moto.resume()
    assert store.get("k") == b"x"
