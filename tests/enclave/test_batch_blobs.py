"""One durable blob per batch, ranged key references, and group commit of small creates."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from signd.chains import address_deriver
from signd.crypto.secp256k1 import generate_private_key, recover_public_key
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CreatedKey, KeyReference, MessageType
from signd.enclave.references import BATCH_BLOB_PREFIX, MAX_BATCH_BLOB_SIZE, BlobRange
from signd.enclave.sealing import SealedKey, seal_private_key
from signd.enclave.server import start_enclave
from signd.enclave.signer import ENCRYPTION_CONTEXT, EnclaveSigner
from signd.enclave.transport import InProcessTransport
from signd.errors import DependencyUnavailable, IntegrityError, KeyExists, KeyNotFound
from tests.enclave.batch_blobs import (
    GatedBlobStore,
    open_group_keys,
    range_of,
    read_sealed,
    wait_for,
)
from tests.enclave.fakes import MemoryBlobStore, MemoryKms, MemoryMetadataStore

DIGEST = bytes(range(32))
MESSAGE = "sealed key blob failed its integrity check"
eth_address = address_deriver("ethereum")


class RecordingBlobStore(MemoryBlobStore):
    """Records whole and ranged reads; ``landed_then_failed`` stores a put, then raises (a write
    that timed out but landed); ``refuse_puts`` raises KeyExists."""

    def __init__(self) -> None:
        super().__init__()
        self.whole_reads: list[str] = []
        self.ranged_reads: list[tuple[str, int, int]] = []
        self.deleted: list[str] = []
        self.landed_then_failed = False
        self.refuse_puts = False

    def get(self, name: str) -> bytes:
        self.whole_reads.append(name)
        return super().get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self.ranged_reads.append((name, offset, length))
        data = super().get(name)[offset : offset + length]
        if len(data) != length:
            raise KeyNotFound(f"blob {name!r} has no bytes {offset}..{offset + length}")
        return data

    def put(self, name: str, data: bytes) -> None:
        if self.refuse_puts:
            raise KeyExists(f"blob {name!r} already exists")
        super().put(name, data)
        if self.landed_then_failed:
            raise DependencyUnavailable("memory blob store timed out on a write")

    def delete(self, name: str) -> None:
        self.deleted.append(name)
        super().delete(name)


def signs(signer: EnclaveSigner, key: CreatedKey | KeyReference, public_key: bytes) -> bool:
    reference = key.reference if isinstance(key, CreatedKey) else key
    signature = signer.sign_digest(reference, DIGEST).to_bytes()
    return recover_public_key(DIGEST, signature) == public_key


# --- one blob per batch, ranged references ----------------------------------------------------


def test_a_batch_is_one_blob_written_once_and_tiled_by_its_keys(kms: MemoryKms) -> None:
    blobs = RecordingBlobStore()
    keys = EnclaveSigner(kms, blobs).create_keys("ethereum", 20)
    assert blobs.puts == 1
    [name] = blobs.blobs
    assert name.startswith(BATCH_BLOB_PREFIX)
    ranges = [range_of(key.blob) for key in keys]
    assert {where.name for where in ranges} == {name}
    assert [str(where) for where in ranges] == [key.blob for key in keys]
    offset = 0
    for where in ranges:  # contiguous, in order, no gaps or overlaps, covering the whole blob
        assert where.offset == offset
        offset += where.length
    assert offset == len(blobs.blobs[name])
    sealed = [SealedKey.from_bytes(read_sealed(blobs, key.blob)) for key in keys]
    assert len({s.nonce for s in sealed}) == 20
    assert len({s.encrypted_data_key for s in sealed}) == 1


def test_a_signature_reads_only_its_own_range(kms: MemoryKms) -> None:
    blobs = RecordingBlobStore()
    signer = EnclaveSigner(kms, blobs)
    keys = signer.create_keys("ethereum", 5)
    assert signs(signer, keys[3], keys[3].public_key)
    where = range_of(keys[3].blob)
    assert blobs.ranged_reads == [(where.name, where.offset, where.length)]
    assert blobs.whole_reads == []


def test_an_old_single_key_blob_is_still_read_whole(kms: MemoryKms) -> None:
    blobs = RecordingBlobStore()
    signer = EnclaveSigner(kms, blobs)
    private_key = generate_private_key()
    public_key = private_key.public_key.format(compressed=True)
    key_id, address = "0123456789abcdef0123456789abcdef", eth_address(public_key)
    data_key = kms.generate_data_key(encryption_context=ENCRYPTION_CONTEXT)
    sealed = seal_private_key(
        private_key.secret,
        data_key.plaintext,
        kms_key_id=data_key.kms_key_id,
        encrypted_data_key=data_key.ciphertext,
        key_id=key_id,
        chain="ethereum",
        address=address,
    )
    blobs.put(f"enclave-{key_id}", sealed.to_bytes())
    old = KeyReference(key_id, "ethereum", address, f"enclave-{key_id}")
    assert BlobRange.parse(old.blob) is None
    assert signs(signer, old, public_key)
    assert blobs.whole_reads == [f"enclave-{key_id}"]
    assert blobs.ranged_reads == []
    blobs.blobs[old.blob] = blobs.blobs[old.blob][:-1]
    signer.flush_cache()
    with pytest.raises(IntegrityError):
        signer.sign_digest(old, DIGEST)


def test_a_reference_to_another_keys_range_never_signs(
    kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    signer = EnclaveSigner(kms, blobs)
    first, second, third = signer.create_keys("ethereum", 3)
    [elsewhere] = signer.create_keys("ethereum", 1)
    a, b = range_of(first.blob), range_of(second.blob)
    wrong_ranges = [
        second.blob,  # same batch, same data key: only the AEAD binding catches it
        elsewhere.blob,  # another batch
        f"{a.name}@{b.offset + 1}+{b.length - 1}",  # shifted into the next key
        f"{a.name}@{a.offset}+{a.length + 1}",  # this key plus the next key's first byte
        f"{a.name}@{a.offset}+{a.length - 1}",  # cut short
        f"{elsewhere.blob.split('@')[0]}@{a.offset}+{a.length}",  # right range, wrong blob
    ]
    for blob in wrong_ranges:
        with pytest.raises(IntegrityError) as caught:
            signer.sign_digest(KeyReference(first.key_id, "ethereum", first.address, blob), DIGEST)
        assert caught.value.message == MESSAGE
    assert signer.cached_keys == 0
    for key in (first, second, third, elsewhere):
        assert signs(signer, key, key.public_key)


def test_a_range_past_the_end_of_its_blob_is_missing(
    kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    signer = EnclaveSigner(kms, blobs)
    keys = signer.create_keys("ethereum", 3)
    last = range_of(keys[-1].blob)
    blobs.blobs[last.name] = blobs.blobs[last.name][: last.offset]  # the batch blob cut short
    with pytest.raises(KeyNotFound):
        signer.sign_digest(keys[-1].reference, DIGEST)
    assert signs(signer, keys[0], keys[0].public_key)


VALID = f"{BATCH_BLOB_PREFIX}{'ab' * 16}"


@pytest.mark.parametrize(
    "reference",
    [
        f"{VALID}@",
        f"{VALID}@0",
        f"{VALID}@+5",
        f"{VALID}@0+",
        f"{VALID}@-1+5",
        f"{VALID}@+1+5",
        f"{VALID}@01+5",
        f"{VALID}@0+05",
        f"{VALID}@0+0",
        f"{VALID}@0+4097",
        f"{VALID}@{MAX_BATCH_BLOB_SIZE}+1",
        f"{VALID}@99999999999999999999+1",
        f"{VALID}@ 0+5",
        f"{VALID}@0+5 ",
        f"{VALID}@0+5\n",
        f"{VALID}@\u0660+5",  # ARABIC-INDIC DIGIT ZERO: a digit to str.isdigit, not to us
        f"{VALID}@0x10+5",
        f"{VALID}@0+5@0+5",
        f"{VALID}@0_0+5",
        f"enclave-{'ab' * 16}@0+5",  # a range of something that is not a batch blob
        "@0+5",
        f"{BATCH_BLOB_PREFIX}../../etc@0+5",
        f"{BATCH_BLOB_PREFIX}a/b@0+5",
        f"{BATCH_BLOB_PREFIX}a\x00b@0+5",
        f"{BATCH_BLOB_PREFIX}{'a' * 200}@0+5",
    ],
)
def test_malformed_references_are_integrity_errors_and_read_nothing(
    kms: MemoryKms, reference: str
) -> None:
    blobs = RecordingBlobStore()
    signer = EnclaveSigner(kms, blobs)
    [key] = signer.create_keys("ethereum", 1)
    with pytest.raises(IntegrityError) as caught:
        signer.sign_digest(KeyReference(key.key_id, "ethereum", key.address, reference), DIGEST)
    assert caught.value.message == MESSAGE
    assert (blobs.whole_reads, blobs.ranged_reads, kms.decrypted) == ([], [], 1)


def test_a_well_formed_reference_round_trips() -> None:
    where = BlobRange.parse(f"{VALID}@4095+261")
    assert where == BlobRange(VALID, 4095, 261)
    assert str(where) == f"{VALID}@4095+261"
    assert BlobRange.parse(f"{VALID}@0+4096") == BlobRange(VALID, 0, 4096)


def test_a_failed_batch_write_leaves_no_blob(kms: MemoryKms) -> None:
    blobs = RecordingBlobStore()
    signer = EnclaveSigner(kms, blobs)
    blobs.landed_then_failed = True
    with pytest.raises(DependencyUnavailable):
        signer.create_keys("ethereum", 10)
    assert blobs.blobs == {}
    assert len(blobs.deleted) == 1
    assert blobs.deleted[0].startswith(BATCH_BLOB_PREFIX)


def test_a_blob_that_is_not_the_batchs_own_is_not_deleted(kms: MemoryKms) -> None:
    blobs = RecordingBlobStore()
    blobs.refuse_puts = True
    with pytest.raises(KeyExists):
        EnclaveSigner(kms, blobs).create_keys("ethereum", 2)
    assert blobs.deleted == []


# --- group commit -----------------------------------------------------------------------------


def start_callers(
    signer: EnclaveSigner, chains: list[str]
) -> tuple[list[threading.Thread], dict[int, list[CreatedKey] | BaseException]]:
    results: dict[int, list[CreatedKey] | BaseException] = {}

    def call(index: int, chain: str) -> None:
        try:
            results[index] = signer.create_keys(chain, 1)
        except BaseException as error:
            results[index] = error

    threads = [
        threading.Thread(target=call, args=(i, chain), daemon=True)
        for i, chain in enumerate(chains)
    ]
    for thread in threads:
        thread.start()
    return threads, results


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_single_key_callers_arriving_during_a_write_share_the_next_one(kms: MemoryKms) -> None:
    blobs = GatedBlobStore()
    other = lambda public_key: "other:" + public_key.hex()  # noqa: E731
    signer = EnclaveSigner(
        kms,
        blobs,
        address_deriver=lambda chain: {"ethereum": eth_address, "other": other}[chain],
        group_max_wait=10.0,  # longer than the test: only the write in flight closes the group
    )
    first, first_results = start_callers(signer, ["ethereum"])
    assert blobs.writing.wait(5)
    chains = ["ethereum", "other"] * 4
    threads, results = start_callers(signer, chains)
    wait_for(lambda: open_group_keys(signer) == len(chains))
    assert blobs.puts == 0 and kms.generated == 1
    blobs.gate.set()
    join(first + threads)

    [lone] = first_results[0]  # type: ignore[misc]
    grouped: list[CreatedKey] = []
    for index, chain in enumerate(chains):
        answer = results[index]
        assert isinstance(answer, list)
        [key] = answer
        assert key.chain == chain
        grouped.append(key)
    assert (blobs.puts, kms.generated) == (2, 2)  # one data key and one write for the group
    assert {range_of(key.blob).name for key in grouped} == {
        name for name in blobs.blobs if name != range_of(lone.blob).name
    }
    everyone = [lone, *grouped]
    assert len({key.key_id for key in everyone}) == len({key.address for key in everyone}) == 9
    assert len({key.blob for key in everyone}) == 9
    for key in everyone:
        assert signs(signer, key, key.public_key)


def test_a_group_is_bounded_and_big_requests_are_not_held(kms: MemoryKms) -> None:
    blobs = GatedBlobStore()
    signer = EnclaveSigner(kms, blobs, group_max_keys=4, group_max_wait=10.0)
    first, _ = start_callers(signer, ["ethereum"])
    assert blobs.writing.wait(5)
    threads, results = start_callers(signer, ["ethereum"] * 10)
    # two full groups of 4 are written at once; the last 2 keys wait for the gated write
    wait_for(lambda: blobs.puts == 2 and open_group_keys(signer) == 2)
    big = signer.create_keys("ethereum", 5)  # more than a group holds: written directly
    assert blobs.puts == 3
    assert len({range_of(key.blob).name for key in big}) == 1
    blobs.gate.set()
    join(first + threads)
    assert blobs.puts == 5
    names = [range_of(answer[0].blob).name for answer in results.values()]  # type: ignore[index]
    assert sorted(names.count(name) for name in set(names)) == [2, 4, 4]


def test_a_failed_group_write_fails_every_caller_and_leaves_no_key(kms: MemoryKms) -> None:
    blobs = GatedBlobStore()
    signer = EnclaveSigner(kms, blobs, group_max_wait=10.0)
    first, first_results = start_callers(signer, ["ethereum"])
    assert blobs.writing.wait(5)
    threads, results = start_callers(signer, ["ethereum"] * 6)
    wait_for(lambda: open_group_keys(signer) == 6)
    blobs.fail = True
    blobs.gate.set()
    join(first + threads)

    [lone] = first_results[0]  # type: ignore[misc]
    errors = list(results.values())
    assert all(isinstance(error, DependencyUnavailable) for error in errors)
    assert len({id(error) for error in errors}) == 6  # each caller its own exception object
    assert list(blobs.blobs) == [range_of(lone.blob).name]
    assert signer._open_group is None and signer._writes_in_flight == 0
    blobs.fail = False
    [key] = signer.create_keys("ethereum", 1)
    assert signs(signer, key, key.public_key)


def test_a_request_with_nothing_in_flight_is_written_at_once(
    kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    signer = EnclaveSigner(kms, blobs, group_max_wait=1.0)
    start = time.monotonic()
    for _ in range(5):
        signer.create_keys("ethereum", 1)
    assert time.monotonic() - start < 1.0
    assert blobs.puts == 5


def test_many_concurrent_callers_through_the_backend_each_get_their_own_key(
    client: EnclaveClient, metadata: MemoryMetadataStore, blobs: MemoryBlobStore
) -> None:
    backend = EnclaveBackend(client, metadata)
    with ThreadPoolExecutor(32) as pool:
        keys = list(pool.map(lambda _: backend.create_keys("ethereum", eth_address)[0], range(96)))
    assert len({key.key_id for key in keys}) == len({key.address for key in keys}) == 96
    assert len(metadata.records) == 96
    assert blobs.puts == len(blobs.blobs) <= 96
    for key in keys[::7]:
        signature = backend.sign_digest(key, DIGEST)
        assert signature.recover_public_key(DIGEST) == key.public_key


def test_the_server_lets_every_request_in_flight_join_a_group_and_keeps_signing(
    kms: MemoryKms,
) -> None:
    """Waiting creates have threads of their own: neither the group nor signing is capped by
    the (few) workers that run everything else."""
    blobs = GatedBlobStore()
    server = start_enclave(None, kms, blobs, workers=2)
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=10.0)
    signer = server.app.signer
    try:
        signer._group_max_wait = 10.0  # only the write in flight closes the group
        first = client.submit(MessageType.CREATE_KEYS, {"chain": "ethereum", "count": 1})
        assert blobs.writing.wait(5)
        waiting = [
            client.submit(MessageType.CREATE_KEYS, {"chain": "ethereum", "count": 1})
            for _ in range(20)
        ]
        wait_for(lambda: open_group_keys(signer) == 20)
        [old] = signer.create_keys("ethereum", 65)[:1]  # a big request is not held either
        signature = client.sign_digest(old.reference, DIGEST)
        assert recover_public_key(DIGEST, signature) == old.public_key
        blobs.gate.set()
        keys = [CreatedKey.from_body(f.result(10)["keys"][0]) for f in [first, *waiting]]
        assert len({key.key_id for key in keys}) == 21
        assert blobs.puts == 3  # the first write, the big request's, and one for the group
    finally:
        client.close()
        server.close()
