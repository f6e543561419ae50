"""EnclaveBackend: the custody interface over the enclave, as callers see it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signd.chains import address_deriver
from signd.custody.base import KeyInfo
from signd.custody.enclave import GROUPS_AT_ONCE, EnclaveBackend
from signd.enclave import server as server_module
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CreatedKey
from signd.errors import (
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyNotFound,
)
from signd.storage.sqlite import SqliteMetadataStore
from tests.enclave.batch_blobs import range_of, read_sealed, swap_sealed
from tests.enclave.fakes import (
    MemoryBlobStore,
    MemoryKms,
    MemoryMetadataStore,
    unseal_in_test,
)

eth_address = address_deriver("ethereum")
DIGEST = b"\xab" * 32


def verifies(info: KeyInfo, digest: bytes, r: int, s: int) -> bool:
    der = encode_dss_signature(r, s)
    return bool(coincurve.PublicKey(info.public_key).verify(der, digest, hasher=None))


def test_create_100_keys_sign_and_verify(
    backend: EnclaveBackend, metadata: MemoryMetadataStore, blobs: MemoryBlobStore
) -> None:
    progress: list[int] = []
    keys = backend.create_keys(
        "ethereum", eth_address, count=100, labels=["deposit"], progress=progress.append
    )
    assert progress == [100]
    assert len(keys) == len({k.address for k in keys}) == 100
    assert len(metadata.records) == 100
    for i, key in enumerate(keys):
        assert key.custody == "enclave"
        assert key.labels == ("deposit",)
        assert key.address == eth_address(key.public_key)
        assert range_of(key.details["blob"]).name in blobs.blobs
        digest = bytes([i]) * 32
        signature = backend.sign_digest(key.key_id, digest)
        assert verifies(key, digest, signature.r, signature.s)
        assert signature.recover_public_key(digest) == key.public_key
    assert blobs.puts == len(blobs.blobs) == 1  # one durable write for the whole batch


def test_batches_report_progress_and_each_is_recorded(
    client: EnclaveClient, metadata: MemoryMetadataStore
) -> None:
    backend = EnclaveBackend(client, metadata, batch_size=7)
    progress: list[int] = []
    keys = backend.create_keys("ethereum", eth_address, count=20, progress=progress.append)
    assert progress == [7, 14, 20]
    assert [r.key_id for r in metadata.records] == [k.key_id for k in keys]


def test_lookups_read_the_metadata_store(backend: EnclaveBackend) -> None:
    keys = backend.create_keys("ethereum", eth_address, count=5, labels=["a"])
    backend.create_keys("ethereum", eth_address, count=2, labels=["b"])
    assert backend.find_key(keys[0].key_id) == keys[0]
    assert backend.find_key(keys[1].address) == keys[1]
    assert backend.find_key("nope") is None
    with pytest.raises(KeyNotFound):
        backend.get_key("nope")
    assert backend.public_key(keys[2].key_id) == keys[2].public_key
    first = backend.list_keys(limit=4)
    second = backend.list_keys(limit=4, cursor=first.next_cursor)
    assert [k.key_id for k in first.keys + second.keys][:5] == [k.key_id for k in keys]
    assert second.next_cursor is None
    assert len(backend.list_keys(label="b").keys) == 2
    assert backend.list_keys(chain="bitcoin").keys == []


def test_key_info_looks_like_any_other_backends(backend: EnclaveBackend) -> None:
    [key] = backend.create_keys("ethereum", eth_address)
    body = key.to_dict()
    assert set(body) == {
        "key_id",
        "chain",
        "address",
        "public_key",
        "custody",
        "created_at",
        "labels",
        "details",
    }
    assert body["details"] == {"blob": key.details["blob"]}
    assert body["public_key"] == "0x" + key.public_key.hex()


def test_a_host_derivation_that_disagrees_is_refused(
    backend: EnclaveBackend, metadata: MemoryMetadataStore
) -> None:
    with pytest.raises(IntegrityError):
        backend.create_keys("ethereum", lambda public_key: "0x" + "00" * 20, count=3)
    assert metadata.records == []


@pytest.mark.parametrize(
    ("chain", "count", "labels"),
    [("", 1, ()), ("ethereum", 0, ()), ("ethereum", 1, ("bad label ",)), ("nochain", 1, ())],
)
def test_bad_create_arguments(
    backend: EnclaveBackend, chain: str, count: int, labels: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidField):
        backend.create_keys(chain, eth_address, count=count, labels=labels)


def test_swapped_blobs_surface_as_integrity_errors(
    backend: EnclaveBackend, blobs: MemoryBlobStore, client: EnclaveClient
) -> None:
    first, second = backend.create_keys("ethereum", eth_address, count=2)
    swap_sealed(blobs, first.details["blob"], second.details["blob"])
    client.flush_cache()
    with pytest.raises(IntegrityError):
        backend.sign_digest(first, DIGEST)


def test_a_deleted_blob_is_key_not_found(backend: EnclaveBackend, blobs: MemoryBlobStore) -> None:
    [key] = backend.create_keys("ethereum", eth_address)
    del blobs.blobs[range_of(key.details["blob"]).name]
    with pytest.raises(KeyNotFound):
        backend.sign_digest(key, DIGEST)


def test_keys_of_other_custody_are_not_signed(backend: EnclaveBackend) -> None:
    [key] = backend.create_keys("ethereum", eth_address)
    foreign = KeyInfo(
        key.key_id, key.chain, key.address, key.public_key, "keystore", key.created_at
    )
    with pytest.raises(KeyNotFound):
        backend.sign_digest(foreign, DIGEST)
    with pytest.raises(KeyNotFound):
        backend.sign_digests([(foreign, DIGEST)])


def test_dependencies_down_are_clear_and_leave_no_usable_key(
    backend: EnclaveBackend, kms: MemoryKms, blobs: MemoryBlobStore, metadata: MemoryMetadataStore
) -> None:
    kms.down = True
    with pytest.raises(DependencyUnavailable):
        backend.create_keys("ethereum", eth_address, count=2)
    with pytest.raises(DependencyUnavailable):
        backend.check_health()
    kms.down = False
    blobs.fail_puts_after = 0
    with pytest.raises(DependencyUnavailable):
        backend.create_keys("ethereum", eth_address, count=2)
    blobs.fail_puts_after = None
    metadata.down = True
    with pytest.raises(DependencyUnavailable):
        backend.create_keys("ethereum", eth_address, count=2)
    metadata.down = False
    assert metadata.records == []
    backend.check_health()
    [key] = backend.create_keys("ethereum", eth_address)
    assert backend.sign_digest(key, DIGEST).recover_public_key(DIGEST) == key.public_key


def test_sign_digests_batches_and_normalises(
    backend: EnclaveBackend, client: EnclaveClient
) -> None:
    keys = backend.create_keys("ethereum", eth_address, count=5)
    client.max_batch = 2
    items = [(k, bytes([i + 1]) * 32) for i, k in enumerate(keys)] + [(keys[0].address, DIGEST)]
    signatures = backend.sign_digests(items)
    assert len(signatures) == 6
    for (key, digest), signature in zip(items, signatures, strict=True):
        info = key if isinstance(key, KeyInfo) else backend.get_key(key)
        assert signature.recover_public_key(digest) == info.public_key
        assert signature == backend.sign_digest(info, digest)


def test_a_sign_digests_batch_unseals_keys_created_together_with_one_decrypt_and_read(
    backend: EnclaveBackend, client: EnclaveClient, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    keys = backend.create_keys("ethereum", eth_address, count=6)
    client.flush_cache()
    decrypts, gets = kms.decrypted, blobs.gets
    signatures = backend.sign_digests([(key, DIGEST) for key in keys])
    assert [s.recover_public_key(DIGEST) for s in signatures] == [k.public_key for k in keys]
    assert (kms.decrypted, blobs.gets) == (decrypts + 1, gets + 1)


def test_concurrent_signing_through_one_backend(backend: EnclaveBackend) -> None:
    keys = backend.create_keys("ethereum", eth_address, count=4)
    errors: list[BaseException] = []

    def worker(key: KeyInfo) -> None:
        try:
            for i in range(30):
                digest = bytes([i]) * 32
                assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_with_the_sqlite_metadata_store(client: EnclaveClient, tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "keys.db")
    backend = EnclaveBackend(client, store)
    keys = backend.create_keys("ethereum", eth_address, count=3, labels=["x"])
    reopened = EnclaveBackend(client, SqliteMetadataStore(tmp_path / "keys.db"))
    for key in keys:
        found = reopened.get_key(key.address)
        assert found == key
        assert found.details == key.details
        assert reopened.sign_digest(found, DIGEST).recover_public_key(DIGEST) == key.public_key
    assert [k.key_id for k in reopened.list_keys(label="x").keys] == [k.key_id for k in keys]


def test_no_secret_reaches_the_host_logs_or_reprs(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: EnclaveBackend,
    client: EnclaveClient,
    kms: MemoryKms,
    blobs: MemoryBlobStore,
) -> None:
    sent: list[bytes] = []
    original_send = server_module._Writer.send

    def recording_send(self: object, data: bytes) -> None:
        sent.append(data)
        original_send(self, data)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module._Writer, "send", recording_send)
    caplog.set_level("DEBUG")
    keys = backend.create_keys("ethereum", eth_address, count=3)
    for key in keys:
        backend.sign_digest(key, DIGEST)
    backend.sign_digests([(k, DIGEST) for k in keys])
    a, b = keys[0].details["blob"], keys[1].details["blob"]
    swap_sealed(blobs, a, b)
    client.flush_cache()
    with pytest.raises(IntegrityError):
        backend.sign_digest(keys[0], DIGEST)
    kms.down = True
    with pytest.raises(DependencyUnavailable):
        backend.check_health()
    kms.down = False
    swap_sealed(blobs, a, b)

    secrets = list(kms.issued)
    for key in keys:
        created = CreatedKey(
            key.key_id, key.chain, key.address, key.public_key, key.details["blob"]
        )
        secrets.append(unseal_in_test(kms, read_sealed(blobs, created.blob), created))
    assert len(secrets) == 4
    assert len(sent) >= 9
    wire = b"".join(sent)
    texts = caplog.text + repr(backend) + repr(client) + repr(backend._client)
    for secret in secrets:
        assert secret not in wire
        assert secret.hex() not in texts


# --- batches asked ahead ---------------------------------------------------------------------


def in_flight_counter(
    monkeypatch: pytest.MonkeyPatch, client: EnclaveClient, pause: float = 0.02
) -> list[int]:
    """Make each CREATE_KEYS take at least ``pause`` s; the list gets each one's in-flight count."""
    seen: list[int] = []
    lock = threading.Lock()
    running = [0]
    create_keys = client.create_keys

    def counting(chain: str, count: int, labels: Sequence[str] = ()) -> list[CreatedKey]:
        with lock:
            running[0] += 1
            seen.append(running[0])
        try:
            time.sleep(pause)
            return create_keys(chain, count, labels)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(client, "create_keys", counting)
    return seen


def test_batches_are_asked_ahead_and_recorded_in_order(
    client: EnclaveClient, metadata: MemoryMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = in_flight_counter(monkeypatch, client)
    backend = EnclaveBackend(client, metadata, batch_size=5)
    progress: list[int] = []
    keys = backend.create_keys("ethereum", eth_address, count=42, progress=progress.append)
    assert progress == [*range(5, 42, 5), 42]
    assert [r.key_id for r in metadata.records] == [k.key_id for k in keys]
    assert max(seen) == EnclaveBackend.batches_ahead
    signatures = backend.sign_digests([(k, DIGEST) for k in keys])
    assert [s.recover_public_key(DIGEST) for s in signatures] == [k.public_key for k in keys]


def test_a_failed_batch_leaves_earlier_batches_recorded_and_nothing_after(
    client: EnclaveClient,
    metadata: MemoryMetadataStore,
    blobs: MemoryBlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_flight_counter(monkeypatch, client)
    backend = EnclaveBackend(client, metadata, batch_size=5)
    blobs.fail_puts_after = 3
    with pytest.raises(DependencyUnavailable):
        backend.create_keys("ethereum", eth_address, count=60)
    assert not [t for t in threading.enumerate() if t.name.startswith("signd-keygen")]
    assert len(metadata.records) in (5, 10, 15)
    for record in metadata.records:  # no record names a blob that is not there
        assert range_of(dict(record.details)["blob"]).name in blobs.blobs
    assert blobs.puts == 3


def test_a_batch_the_host_refuses_stops_the_keys_asked_after_it(
    client: EnclaveClient, metadata: MemoryMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = in_flight_counter(monkeypatch, client)
    backend = EnclaveBackend(client, metadata, batch_size=4)
    derived = [0]

    def wrong_from_the_sixth_key(public_key: bytes) -> str:
        derived[0] += 1
        return eth_address(public_key) if derived[0] < 6 else "0x" + "00" * 20

    with pytest.raises(IntegrityError):
        backend.create_keys("ethereum", wrong_from_the_sixth_key, count=40)
    assert len(metadata.records) == 4
    assert len(seen) <= 2 + EnclaveBackend.batches_ahead


# --- concurrent small requests created together ----------------------------------------------


def run_callers(count: int, call: Callable[[int], object]) -> list[object]:
    """Run ``call(i)`` in ``count`` threads started together; each one's result or error."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = call(index)
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_concurrent_small_requests_share_enclave_requests(
    backend: EnclaveBackend,
    client: EnclaveClient,
    metadata: MemoryMetadataStore,
    blobs: MemoryBlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = in_flight_counter(monkeypatch, client)
    progress: list[int] = []
    outcomes = run_callers(
        24,
        lambda i: backend.create_keys(
            "ethereum", eth_address, count=1 + i % 2, progress=progress.append
        ),
    )
    keys = [key for made in outcomes for key in made]  # type: ignore[attr-defined]
    assert [len(made) for made in outcomes] == [1 + i % 2 for i in range(24)]  # type: ignore[arg-type]
    assert sorted(progress) == sorted(1 + i % 2 for i in range(24))
    assert len({k.key_id for k in keys}) == len(keys) == 36
    assert len(seen) < 24  # requests were created together
    assert max(seen) <= GROUPS_AT_ONCE
    assert blobs.puts == len(seen)
    assert sorted(r.key_id for r in metadata.records) == sorted(k.key_id for k in keys)
    signatures = backend.sign_digests([(k, DIGEST) for k in keys])
    assert [s.recover_public_key(DIGEST) for s in signatures] == [k.public_key for k in keys]


def test_only_requests_for_the_same_chain_and_labels_are_created_together(
    backend: EnclaveBackend, client: EnclaveClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight_counter(monkeypatch, client)
    wanted = [("hot",), ("cold",), (), ("hot", "eu")] * 5
    outcomes = run_callers(
        len(wanted), lambda i: backend.create_keys("ethereum", eth_address, labels=wanted[i])
    )
    for labels, made in zip(wanted, outcomes, strict=True):
        [key] = made  # type: ignore[misc]
        assert key.labels == labels
        assert backend.sign_digest(key, DIGEST).recover_public_key(DIGEST) == key.public_key


def test_a_failed_group_fails_each_of_its_callers_and_records_nothing(
    backend: EnclaveBackend, kms: MemoryKms, metadata: MemoryMetadataStore
) -> None:
    kms.down = True
    outcomes = run_callers(12, lambda _: backend.create_keys("ethereum", eth_address))
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 12  # each caller raises its own error
    assert metadata.records == []
    assert backend._lines == {}
    kms.down = False
    outcomes = run_callers(4, lambda _: backend.create_keys("ethereum", eth_address))
    assert len(metadata.records) == 4
