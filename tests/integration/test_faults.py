"""Bad days with real dependencies: KMS, S3 or PostgreSQL down or stuck, the enclave killed.

KMS and S3 are two separate moto_servers here, so that one can be stopped while the other
keeps answering. moto keeps its state in memory only, so "stuck" (SIGSTOP: connections open,
nothing answers, the harder case for timeouts) is what lets it come back with the same KMS key
and bucket; PostgreSQL keeps its data on disk, so it is really stopped and started again.

What must hold: every failure is a DependencyUnavailable within the configured timeouts (no
hang), no record in the metadata store ever names a blob that is missing (a failed create
leaves nothing usable behind), and everything recovers by itself once the dependency is back,
without restarting the enclave or rebuilding the host's signer.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signd.config import load_settings
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import KeyInfo
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable, SigndError
from signd.operations import Signer
from signd.operations.backends import build_signer
from signd.operations.components import build_blob_store, build_metadata_store
from signd.storage.base import BlobStore, MetadataStore
from tests.fixtures.servers import MotoServer, PostgresServer, moto_server
from tests.integration.support import (
    SigndProcess,
    all_records,
    aws_tables,
    child_pids,
    enclave_process,
    records_with_missing_blobs,
    short_dir,
    start_enclave_process,
    subprocess_env,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIGEST = b"\x3c" * 32
DEPENDENCY_TIMEOUT = 1.0
"""KMS, S3 and PostgreSQL timeouts configured for the node (seconds)."""
FAIL_WITHIN = 8.0
"""A failing call must return within this (S3: 2 attempts of 1 s + backoff; enclave: 10 s)."""


@dataclass
class Dependencies:
    kms: MotoServer
    s3: MotoServer
    postgres: PostgresServer
    key_id: str
    bucket: str

    def tables(self, dsn: str, *, timeout: float = DEPENDENCY_TIMEOUT) -> dict[str, Any]:
        return aws_tables(
            kms_endpoint=self.kms.endpoint_url,
            key_id=self.key_id,
            s3_endpoint=self.s3.endpoint_url,
            bucket=self.bucket,
            dsn=dsn,
            timeout=timeout,
        )

    def object_count(self) -> int:
        listing = self.s3.client("s3").list_objects_v2(Bucket=self.bucket, MaxKeys=1000)
        return int(listing.get("KeyCount", 0))


@pytest.fixture(scope="module")
def deps(postgres_server: PostgresServer) -> Iterator[Dependencies]:
    """Two moto servers of this module's own (pausing them disturbs no other test)."""
    with moto_server() as kms, moto_server() as s3:
        key_id = kms.client("kms").create_key()["KeyMetadata"]["KeyId"]
        bucket = "signd-faults-" + secrets.token_hex(4)
        s3.client("s3").create_bucket(Bucket=bucket)
        yield Dependencies(kms, s3, postgres_server, key_id, bucket)


@dataclass
class Node:
    home: Path
    socket: Path
    enclave: SigndProcess
    signer: Signer
    metadata: MetadataStore
    blobs: BlobStore

    def create(self, count: int = 1) -> list[KeyInfo]:
        return self.signer.create_keys(chain="ethereum", custody="enclave", count=count)

    def sign(self, key: KeyInfo) -> RecoverableSignature:
        signature = self.signer.sign_hash(key.key_id, DIGEST)
        assert signature.recover_public_key(DIGEST) == key.public_key
        return signature

    def flush(self) -> None:
        client = EnclaveClient(UnixTransport(str(self.socket)), timeout=5.0)
        try:
            client.flush_cache()
        finally:
            client.close()

    def record_count(self) -> int:
        return len(all_records(self.metadata))


@pytest.fixture
def node(deps: Dependencies, tmp_path: Path) -> Iterator[Node]:
    """A ``signd enclave`` process and its host-side signer, on the module's dependencies."""
    home = tmp_path / "home"
    with short_dir() as run:
        socket = run / "enclave.sock"
        tables = deps.tables(deps.postgres.create_schema())
        tables["enclave"] = {"transport": f"unix://{socket}", "timeout": 10}
        tables["custody"] = {"enabled": ["enclave"]}
        write_config(home, tables)
        settings = load_settings(home)
        process = enclave_process(home, socket, env=subprocess_env())
        signer = build_signer(settings)
        metadata, blobs = build_metadata_store(settings), build_blob_store(settings)
        try:
            start_enclave_process(process, socket)
            yield Node(home, socket, process, signer, metadata, blobs)
        finally:
            signer.close()
            process.stop()
            metadata.close()
            blobs.close()


def fails_quickly(call: Callable[[], object]) -> DependencyUnavailable:
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as caught:
        call()
    assert time.monotonic() - started < FAIL_WITHIN
    return caught.value


@pytest.mark.parametrize("stuck", ["kms", "s3"])
def test_stuck_kms_or_s3_fails_create_and_cold_sign_then_recovers(
    node: Node, deps: Dependencies, stuck: str
) -> None:
    warm, cold = node.create(2)
    node.sign(warm)
    node.sign(cold)
    node.flush()
    node.sign(warm)  # warm is in the enclave's cache again; cold is not
    records, objects = node.record_count(), deps.object_count()
    enclave_pid = node.enclave.pid
    server = deps.kms if stuck == "kms" else deps.s3
    server.pause()
    try:
        error = fails_quickly(lambda: node.create(3))
        assert ("KMS" if stuck == "kms" else "S3") in error.message
        error = fails_quickly(lambda: node.sign(cold))
        assert ("KMS" if stuck == "kms" else "S3") in error.message
        node.sign(warm)  # a key still unsealed needs neither KMS nor S3
    finally:
        server.resume()
    assert node.record_count() == records
    # KMS stuck: nothing was written. S3 stuck: the one put that timed out may still land once
    # S3 resumes (a write whose answer was lost); it has no record, so it is never usable.
    assert objects <= deps.object_count() <= objects + (stuck == "s3")
    assert records_with_missing_blobs(node.metadata, node.blobs) == []
    [new] = node.create()
    node.sign(new)
    node.sign(cold)
    assert node.enclave.pid == enclave_pid


def test_postgres_down_fails_create_and_sign_then_recovers(node: Node, deps: Dependencies) -> None:
    [key] = node.create()
    records, objects = node.record_count(), deps.object_count()
    deps.postgres.stop()
    try:
        fails_quickly(lambda: node.create(2))
        fails_quickly(lambda: node.sign(key))  # the host cannot look the key up
    finally:
        deps.postgres.start()
    assert node.record_count() == records
    # the enclave sealed and stored two keys the host could not record, in one batch blob: an
    # unreachable orphan
    assert deps.object_count() == objects + 1
    assert records_with_missing_blobs(node.metadata, node.blobs) == []
    node.sign(key)
    [new] = node.create()
    node.sign(new)
    assert node.record_count() == records + 1


def sign_in_background(signer: Signer, key: KeyInfo) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(signer.sign_hash(key.key_id, DIGEST))
        except SigndError as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def kill_mid_request(
    signer: Signer, key: KeyInfo, kms: MotoServer, kill: Callable[[], None]
) -> None:
    """Start a cold signature that hangs on KMS inside the enclave, kill the enclave under it.

    The client retries an idempotent request once on a new connection; with nothing listening
    any more that fails at once, so the caller sees DependencyUnavailable quickly.
    """
    kms.pause()
    try:
        thread, outcome = sign_in_background(signer, key)
        thread.join(0.5)
        assert thread.is_alive(), f"the request was not in flight: {outcome}"
        killed = time.monotonic()
        kill()
        thread.join(FAIL_WITHIN)
        assert not thread.is_alive()
        assert time.monotonic() - killed < 2.0
        [error] = outcome
        assert isinstance(error, DependencyUnavailable)
        assert "enclave" in error.message
    finally:
        kms.resume()


def kill_mid_request_then_retried(
    signer: Signer, key: KeyInfo, kms: MotoServer, kill: Callable[[], None]
) -> None:
    """Kill the auto-started enclave under an in-flight signature: the client retries it on a
    new enclave process, which answers once KMS does; the caller sees a signature."""
    kms.pause()
    try:
        thread, outcome = sign_in_background(signer, key)
        thread.join(0.5)
        assert thread.is_alive(), f"the request was not in flight: {outcome}"
        kill()
        time.sleep(0.5)
        assert thread.is_alive(), f"the retried request did not wait for KMS: {outcome}"
    finally:
        kms.resume()
    thread.join(FAIL_WITHIN + 10)
    assert not thread.is_alive()
    [signature] = outcome
    assert isinstance(signature, RecoverableSignature), signature
    assert signature.recover_public_key(DIGEST) == key.public_key


def test_enclave_killed_mid_request_then_restarted(node: Node, deps: Dependencies) -> None:
    keys = node.create(2)
    node.flush()
    kill_mid_request(node.signer, keys[0], deps.kms, node.enclave.kill)
    fails_quickly(lambda: node.sign(keys[1]))
    start_enclave_process(node.enclave, node.socket)
    for key in keys:
        node.sign(key)
    assert records_with_missing_blobs(node.metadata, node.blobs) == []


def test_local_enclave_killed_mid_request_restarts_itself(
    deps: Dependencies, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``[enclave] transport``: build_signer starts ``signd enclave`` itself, and again."""
    for name, value in subprocess_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    tables = deps.tables(deps.postgres.create_schema(), timeout=5.0)
    tables["enclave"] = {"timeout": 10}
    tables["custody"] = {"enabled": ["enclave"]}
    write_config(home, tables)
    signer = build_signer(load_settings(home))
    marker = f"--home {home} enclave"
    try:
        [key] = signer.create_keys(chain="ethereum", custody="enclave")
        [first_pid] = child_pids(os.getpid(), containing=marker)
        kill_mid_request_then_retried(signer, key, deps.kms, lambda: os.kill(first_pid, 9))
        signature = signer.sign_hash(key.key_id, DIGEST)
        assert signature.recover_public_key(DIGEST) == key.public_key
        [second_pid] = child_pids(os.getpid(), containing=marker)
        assert second_pid != first_pid
    finally:
        signer.close()
    wait_until(
        lambda: not child_pids(os.getpid(), containing=marker),
        timeout=10,
        what="the local enclave to stop with its signer",
    )
