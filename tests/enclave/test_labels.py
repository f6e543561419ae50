"""Key labels bound in the sealed blob: a host that relabels a key gets no signature from it."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd.chains import address_deriver
from signd.crypto.secp256k1 import generate_private_key, recover_public_key
from signd.custody.base import KeyInfo, utc_now
from signd.custody.enclave import SEALED_LABELS_DETAIL, EnclaveBackend
from signd.custody.metadata import record_from_info
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CreatedKey, KeyReference, MessageType, canonical_labels
from signd.enclave.sealing import (
    UNLABELLED_BLOB_VERSION,
    SealedKey,
    associated_data,
)
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.signer import ENCRYPTION_CONTEXT, EnclaveSigner
from signd.enclave.transport import UnixTransport
from signd.errors import IntegrityError, InvalidField
from signd.storage.sqlite import SqliteMetadataStore
from tests.enclave.batch_blobs import (
    GatedBlobStore,
    open_group_keys,
    read_sealed,
    replace_sealed,
    wait_for,
)
from tests.enclave.fakes import MemoryBlobStore, MemoryKms, unseal_in_test

DIGEST = b"\x5a" * 32
eth_address = address_deriver("ethereum")
CORRUPT = "sealed key blob failed its integrity check"


@pytest.fixture
def signer(kms: MemoryKms, blobs: MemoryBlobStore) -> EnclaveSigner:
    return EnclaveSigner(kms, blobs)


def claiming(key: CreatedKey, *labels: str) -> KeyReference:
    """``key``'s reference, claiming ``labels`` instead of the ones its blob binds."""
    return dataclasses.replace(key.reference, labels=labels)


def signs_as(key: CreatedKey, signer: EnclaveSigner, reference: KeyReference) -> bool:
    signature = signer.sign_digest(reference, DIGEST)
    return recover_public_key(DIGEST, signature.to_bytes()) == key.public_key


def refused(signer: EnclaveSigner, reference: KeyReference) -> bool:
    """Both the signature and the label proof are refused, as any other integrity failure."""
    with pytest.raises(IntegrityError) as signing:
        signer.sign_digest(reference, DIGEST)
    with pytest.raises(IntegrityError) as proving:
        signer.verified_key(reference)
    return signing.value.message == proving.value.message == CORRUPT


def legacy_key(kms: MemoryKms, blobs: MemoryBlobStore) -> CreatedKey:
    """A key sealed as before labels were bound (blob version 1), in a single-key blob."""
    private_key = generate_private_key()
    public_key = private_key.public_key.format(compressed=True)
    key_id, address = os.urandom(16).hex(), eth_address(public_key)
    data_key = kms.generate_data_key(encryption_context=ENCRYPTION_CONTEXT)
    nonce = os.urandom(12)
    ad = associated_data(
        key_id=key_id, chain="ethereum", address=address, version=UNLABELLED_BLOB_VERSION
    )
    ciphertext = AESGCM(data_key.plaintext.reveal_bytes()).encrypt(nonce, private_key.secret, ad)
    sealed = SealedKey(
        data_key.kms_key_id, data_key.ciphertext, nonce, ciphertext, version=UNLABELLED_BLOB_VERSION
    )
    blobs.put(f"enclave-{key_id}", sealed.to_bytes())
    return CreatedKey(key_id, "ethereum", address, public_key, f"enclave-{key_id}")


# --- the enclave signer ----------------------------------------------------------------------


def test_created_keys_bind_their_labels_in_canonical_form(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    keys = signer.create_keys("ethereum", 3, labels=["hot", "eu", "hot"])
    for key in keys:
        assert key.labels == ("eu", "hot")
        assert cbor2.loads(read_sealed(blobs, key.blob))["version"] == 2
        assert unseal_in_test(kms, read_sealed(blobs, key.blob), key)
        assert signs_as(key, signer, key.reference)
        assert signs_as(key, signer, claiming(key, "hot", "eu", "eu"))  # same set, any order
        assert signer.verified_key(claiming(key, "hot", "eu")) == key.reference


@pytest.mark.parametrize(
    "claim", [(), ("eu",), ("hot",), ("eu", "hot", "cold"), ("EU", "hot")], ids=repr
)
def test_other_labels_than_the_sealed_ones_are_refused(
    signer: EnclaveSigner, claim: tuple[str, ...]
) -> None:
    [key] = signer.create_keys("ethereum", 1, labels=["eu", "hot"])
    assert refused(signer, claiming(key, *claim))
    assert signer.cached_keys == 0


def test_labels_swapped_between_two_keys_are_refused(signer: EnclaveSigner) -> None:
    [cold] = signer.create_keys("ethereum", 1, labels=["cold"])
    [hot] = signer.create_keys("ethereum", 1, labels=["hot"])
    [plain] = signer.create_keys("ethereum", 1)
    assert refused(signer, claiming(cold, "hot"))
    assert refused(signer, claiming(hot, "cold"))
    assert refused(signer, claiming(plain, "hot"))
    assert refused(signer, claiming(hot))
    assert signs_as(plain, signer, plain.reference)


def test_the_cache_never_serves_a_key_under_other_labels(
    signer: EnclaveSigner, kms: MemoryKms
) -> None:
    [key] = signer.create_keys("ethereum", 1, labels=["cold"])
    assert signs_as(key, signer, key.reference)
    assert signer.verified_key(key.reference) == key.reference
    decrypts = kms.decrypted
    assert signs_as(key, signer, key.reference)  # a cache hit
    assert kms.decrypted == decrypts
    assert refused(signer, claiming(key, "hot"))
    assert refused(signer, claiming(key))
    assert kms.decrypted > decrypts  # each wrong claim had to unseal, and failed
    assert signer.cached_keys == 1


def test_one_group_commit_seals_each_request_with_its_own_labels(kms: MemoryKms) -> None:
    blobs = GatedBlobStore()
    signer = EnclaveSigner(kms, blobs, group_max_wait=10.0)
    wanted = [(), ("a",), ("b", "a"), ("c",)] * 4
    made: dict[int, list[CreatedKey]] = {}

    def create(index: int) -> None:
        made[index] = signer.create_keys("ethereum", 1, labels=wanted[index])

    first = threading.Thread(target=create, args=(0,))
    first.start()
    assert blobs.writing.wait(5)
    threads = [threading.Thread(target=create, args=(i,)) for i in range(1, len(wanted))]
    for thread in threads:
        thread.start()
    wait_for(lambda: open_group_keys(signer) == len(threads))
    blobs.gate.set()
    for thread in [first, *threads]:
        thread.join(10)
    assert blobs.puts == 2  # the first caller's write, then one for everyone else
    for index, labels in enumerate(wanted):
        [key] = made[index]
        assert key.labels == canonical_labels(labels)
        assert signs_as(key, signer, key.reference)
        if labels:
            assert refused(signer, claiming(key))


@pytest.mark.parametrize(
    "labels",
    ["hot", ["x" * 65], [""], [" padded"], ["a\nb"], [str(i) for i in range(17)], [7]],
    ids=["bare-string", "too-long", "empty", "padded", "unprintable", "too-many", "not-text"],
)
def test_bad_labels_are_refused_before_anything_is_made(
    signer: EnclaveSigner, kms: MemoryKms, labels: object
) -> None:
    with pytest.raises(InvalidField) as info:
        signer.create_keys("ethereum", 1, labels=labels)  # type: ignore[arg-type]
    assert info.value.field == "labels"
    with pytest.raises(InvalidField):
        KeyReference("k", "ethereum", "0x00", "enclave-k", labels)  # type: ignore[arg-type]
    assert kms.generated == 0


# --- blobs sealed before labels were bound ---------------------------------------------------


def test_a_version_1_blob_opens_only_as_an_unlabelled_key(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    key = legacy_key(kms, blobs)
    assert refused(signer, claiming(key, "hot"))
    assert signs_as(key, signer, key.reference)
    assert signer.verified_key(key.reference).labels == ()
    assert refused(signer, claiming(key, "hot"))  # nor from the cache


def test_a_labelled_blob_relabelled_as_version_1_is_refused(
    signer: EnclaveSigner, blobs: MemoryBlobStore
) -> None:
    [key] = signer.create_keys("ethereum", 1, labels=["cold"])
    body = cbor2.loads(read_sealed(blobs, key.blob))
    downgraded = replace_sealed(blobs, key.blob, cbor2.dumps({**body, "version": 1}))
    for claim in ((), ("cold",)):
        assert refused(signer, dataclasses.replace(key.reference, blob=downgraded, labels=claim))


# --- the wire --------------------------------------------------------------------------------


def test_labels_cross_the_protocol_canonical_and_optional() -> None:
    created = CreatedKey("k1", "ethereum", "0xabc", b"\x02" * 33, "enclave-k1", ("b", "a"))
    assert created.labels == ("b", "a")  # a created key reports what its blob binds
    body = created.reference.to_body()
    assert body["labels"] == ["a", "b"]
    assert KeyReference.from_body(body) == created.reference
    assert KeyReference.from_body(body).labels == ("a", "b")
    assert CreatedKey.from_body(created.to_body()).labels == ("a", "b")
    plain = KeyReference("k1", "ethereum", "0xabc", "enclave-k1")
    assert "labels" not in plain.to_body()
    assert KeyReference.from_body(plain.to_body()).labels == ()
    for bad in ("a", ["a", 1], ["x" * 65], [str(i) for i in range(17)], {"a": 1}):
        with pytest.raises(InvalidField) as info:
            KeyReference.from_body({**body, "labels": bad})
        assert info.value.field == "labels"


def test_create_and_sign_requests_carry_labels(client: EnclaveClient) -> None:
    keys = client.create_keys("ethereum", 2, ("hot", "eu"))
    assert [k.labels for k in keys] == [("eu", "hot")] * 2
    signature = client.sign_digest(keys[0].reference, DIGEST)
    assert recover_public_key(DIGEST, signature) == keys[0].public_key
    results = client.sign_digests([(keys[0].reference, DIGEST), (claiming(keys[1], "eu"), DIGEST)])
    assert isinstance(results[0], bytes)
    assert isinstance(results[1], IntegrityError)
    with pytest.raises(IntegrityError):
        client.sign_digest(claiming(keys[0]), DIGEST)
    with pytest.raises(InvalidField):
        client.request(
            MessageType.CREATE_KEYS, {"chain": "ethereum", "count": 1, "labels": ["x"] * 17}
        )
    with pytest.raises(InvalidField):
        client.request(
            MessageType.CREATE_KEYS,
            {"chain": "ethereum", "count": 1, "custody": "hsm", "labels": ["x"]},
        )


# --- end to end through a Unix socket --------------------------------------------------------


@pytest.fixture
def unix_client(kms: MemoryKms, blobs: MemoryBlobStore) -> Iterator[EnclaveClient]:
    path = f"/tmp/signd-labels-{os.getpid()}-{time.monotonic_ns()}.sock"
    server: EnclaveServer = start_enclave("unix://" + path, kms, blobs)
    client = EnclaveClient(UnixTransport(path), timeout=10.0)
    yield client
    client.close()
    server.close()


def test_a_host_that_relabels_a_key_gets_no_signature(
    unix_client: EnclaveClient, kms: MemoryKms, blobs: MemoryBlobStore, tmp_path: Path
) -> None:
    metadata = SqliteMetadataStore(tmp_path / "metadata.db")
    backend = EnclaveBackend(unix_client, metadata)
    try:
        cold, plain = (
            backend.create_keys("ethereum", eth_address, labels=["cold", "eu"])[0],
            backend.create_keys("ethereum", eth_address)[0],
        )
        assert cold.labels == ("cold", "eu")
        assert cold.details[SEALED_LABELS_DETAIL] == "true"
        assert SEALED_LABELS_DETAIL not in plain.details
        for key in (cold, plain):
            assert backend.sign_digest(key.key_id, DIGEST).recover_public_key(DIGEST) == (
                key.public_key
            )
        relabelled = dataclasses.replace(cold, labels=("hot",))
        with pytest.raises(IntegrityError):
            backend.sign_digest(relabelled, DIGEST)
        stripped = dataclasses.replace(cold, details={"blob": cold.details["blob"]})
        with pytest.raises(IntegrityError):
            backend.sign_digest(stripped, DIGEST)  # claims no labels: not what the blob binds
        labelled = dataclasses.replace(
            plain, labels=("hot",), details={**plain.details, SEALED_LABELS_DETAIL: "true"}
        )
        with pytest.raises(IntegrityError):
            backend.sign_digest(labelled, DIGEST)
        assert backend.sign_digests([(cold, DIGEST), (plain, DIGEST)])
    finally:
        metadata.close()


def test_an_old_labelled_key_signs_as_unlabelled(
    unix_client: EnclaveClient, kms: MemoryKms, blobs: MemoryBlobStore, tmp_path: Path
) -> None:
    """A record made before blobs bound labels keeps its labels; the enclave sees none."""
    key = legacy_key(kms, blobs)
    metadata = SqliteMetadataStore(tmp_path / "metadata.db")
    backend = EnclaveBackend(unix_client, metadata)
    info = KeyInfo(  # the record as the previous version wrote it
        key_id=key.key_id,
        chain=key.chain,
        address=key.address,
        public_key=key.public_key,
        custody="enclave",
        created_at=utc_now(),
        labels=("deposit",),
        details={"blob": key.blob},
    )
    try:
        metadata.add([record_from_info(info)])
        assert backend.get_key(key.key_id).labels == ("deposit",)
        signature = backend.sign_digest(key.key_id, DIGEST)
        assert signature.recover_public_key(DIGEST) == key.public_key
        forged = dataclasses.replace(info, details={**info.details, SEALED_LABELS_DETAIL: "true"})
        with pytest.raises(IntegrityError):
            backend.sign_digest(forged, DIGEST)
    finally:
        metadata.close()
