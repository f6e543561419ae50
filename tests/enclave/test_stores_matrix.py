"""Enclave custody end to end over both storage stacks, built from configuration.

``local``: LocalKms + FilesystemBlobStore + SqliteMetadataStore (one node's default);
``aws``: AwsKms + S3BlobStore against moto_server, PostgresMetadataStore against a real
PostgreSQL (several nodes). The same tests must pass on both. The enclave listens on a real
Unix socket in this process; KMS, blob store and metadata store are built by the same
registries ``signd enclave`` and ``build_signer`` use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from eth_account import Account

from signd.config import Settings, load_settings
from signd.custody.base import KeyInfo
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.sealing import SealedKey
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import UnixTransport
from signd.errors import IntegrityError
from signd.kms.base import KmsClient
from signd.operations import Signer
from signd.operations.components import build_blob_store, build_kms, build_metadata_store
from signd.storage.base import BlobStore, MetadataStore
from tests.enclave.batch_blobs import range_of, read_sealed, replace_sealed
from tests.fixtures.servers import (  # noqa: F401 - registers the server fixtures
    MotoServer,
    moto_server_fixture,
    postgres_schema_dsn,
    postgres_server_fixture,
    s3_bucket,
)
from tests.integration.support import (
    aws_tables,
    local_tables,
    records_with_missing_blobs,
    short_dir,
    write_config,
)

pytestmark = pytest.mark.integration

SECP256K1_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
BATCH = 4
EIP1559_TX = {
    "type": "0x2",
    "chainId": "0x1",
    "nonce": "0x5",
    "to": "0x3535353535353535353535353535353535353535",
    "value": "0xde0b6b3a7640000",
    "gas": "0x5208",
    "maxFeePerGas": "0x6fc23ac00",
    "maxPriorityFeePerGas": "0x3b9aca00",
    "data": "0x",
}


@dataclass
class Stack:
    settings: Settings
    kms: KmsClient
    blobs: BlobStore
    metadata: MetadataStore
    server: EnclaveServer
    client: EnclaveClient
    backend: EnclaveBackend
    signer: Signer

    def sealed(self, key: KeyInfo) -> SealedKey:
        return SealedKey.from_bytes(read_sealed(self.blobs, key.details["blob"]))

    def replace_blob(self, key: KeyInfo, data: bytes) -> None:
        """What a hostile host can do to storage: rewrite a key's range of its batch blob."""
        assert replace_sealed(self.blobs, key.details["blob"], data) == key.details["blob"]


@pytest.fixture(params=["local", "aws"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    home = tmp_path / "home"
    if request.param == "local":
        tables = local_tables()
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        tables = aws_tables(
            kms_endpoint=moto.endpoint_url,
            key_id=moto.client("kms").create_key()["KeyMetadata"]["KeyId"],
            s3_endpoint=moto.endpoint_url,
            bucket=request.getfixturevalue("s3_bucket"),
            dsn=request.getfixturevalue("postgres_schema_dsn"),
        )
    write_config(home, tables)
    settings = load_settings(home)
    kms, blobs, metadata = (
        build_kms(settings),
        build_blob_store(settings),
        build_metadata_store(settings),
    )
    assert type(kms).__name__ == {"local": "LocalKms", "aws": "AwsKms"}[request.param]
    with short_dir() as run:
        server = start_enclave(f"unix://{run / 'enclave.sock'}", kms, blobs)
        client = EnclaveClient(UnixTransport(str(run / "enclave.sock")), timeout=10.0)
        backend = EnclaveBackend(client, metadata, batch_size=BATCH)
        signer = Signer({"enclave": lambda: backend})
        try:
            yield Stack(settings, kms, blobs, metadata, server, client, backend, signer)
        finally:
            signer.close()
            server.close()
            for component in (kms, blobs, metadata):
                component.close()


def verify(key: KeyInfo, digest: bytes, r: int, s: int) -> None:
    """Check a signature with coincurve (libsecp256k1), independently of signd's code."""
    assert 0 < s <= SECP256K1_HALF_ORDER, "high-S signature"
    der = encode_dss_signature(r, s)
    assert coincurve.PublicKey(key.public_key).verify(der, digest, hasher=None)


def test_create_find_and_list(stack: Stack) -> None:
    [single] = stack.signer.create_keys(chain="ethereum", custody="enclave", labels=["hot"])
    progress: list[int] = []
    batch = stack.signer.create_keys(
        chain="ethereum", custody="enclave", count=10, labels=["deposit"], progress=progress.append
    )
    assert progress == [4, 8, 10]
    created = [single, *batch]
    assert len({key.address for key in created}) == 11

    for key in created:
        assert stack.signer.get_key(key.key_id) == key
        assert stack.signer.get_key(key.address) == key
        assert stack.signer.get_key(key.address.lower()).key_id == key.key_id

    listed: list[KeyInfo] = []
    cursor = None
    for _ in range(5):
        page = stack.signer.list_keys(custody="enclave", cursor=cursor, limit=3)
        assert len(page.keys) <= 3
        listed.extend(page.keys)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [key.key_id for key in listed] == [key.key_id for key in created]
    deposits = stack.signer.list_keys(custody="enclave", label="deposit", limit=100)
    assert [key.key_id for key in deposits.keys] == [key.key_id for key in batch]
    assert records_with_missing_blobs(stack.metadata, stack.blobs) == []


def test_one_data_key_per_batch_and_one_nonce_per_key(stack: Stack) -> None:
    keys = stack.signer.create_keys(chain="ethereum", custody="enclave", count=10)
    sealed = [stack.sealed(key) for key in keys]
    data_keys = [blob.encrypted_data_key for blob in sealed]
    batches = [data_keys[0:4], data_keys[4:8], data_keys[8:10]]
    assert all(len(set(batch)) == 1 for batch in batches)
    assert len({batch[0] for batch in batches}) == 3
    assert len({blob.nonce for blob in sealed}) == 10
    assert len({blob.encrypted_private_key for blob in sealed}) == 10


def test_sign_digest_and_ethereum_transaction(stack: Stack) -> None:
    keys = stack.signer.create_keys(chain="ethereum", custody="enclave", count=3)
    for index, key in enumerate(keys):
        digest = bytes([index + 1]) * 32
        signature = stack.signer.sign_hash(key.address, digest)
        verify(key, digest, signature.r, signature.s)
        assert signature.recover_public_key(digest) == key.public_key

        signed = stack.signer.sign_eth_transaction(key.key_id, {**EIP1559_TX, "nonce": index})
        assert Account.recover_transaction(signed.raw) == key.address == signed.sender
    [first] = stack.backend.sign_digests([(keys[0], b"\x07" * 32)])
    verify(keys[0], b"\x07" * 32, first.r, first.s)


def test_cache_flush_then_sign_again(stack: Stack) -> None:
    keys = stack.signer.create_keys(chain="ethereum", custody="enclave", count=2)
    digest = b"\x42" * 32
    before = [stack.signer.sign_hash(key.key_id, digest) for key in keys]
    assert stack.client.health()["cached_keys"] == 2
    assert stack.client.flush_cache() == 2
    assert stack.client.health()["cached_keys"] == 0
    after = [stack.signer.sign_hash(key.key_id, digest) for key in keys]
    assert after == before  # RFC 6979: the same key signs the same digest the same way
    assert stack.client.health()["cached_keys"] == 2


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_tampered_and_swapped_blobs_are_integrity_errors(stack: Stack) -> None:
    keys = stack.signer.create_keys(chain="ethereum", custody="enclave", count=5)
    other_batch = stack.signer.create_keys(chain="ethereum", custody="enclave", count=1)
    original = {
        key.key_id: read_sealed(stack.blobs, key.details["blob"]) for key in [*keys, *other_batch]
    }
    batch_blobs = [range_of(key.details["blob"]).name for key in [*keys, *other_batch]]
    assert len(set(batch_blobs[:4])) == 1  # one blob per batch: keys[0:4], keys[4], other_batch
    assert len(set(batch_blobs)) == 3
    digest = b"\x33" * 32
    for key in keys:
        stack.signer.sign_hash(key.key_id, digest)  # all warm in the enclave's cache

    sealed = stack.sealed(keys[0])
    stack.replace_blob(
        keys[0],
        dataclasses.replace(
            sealed, encrypted_private_key=flip_last_byte(sealed.encrypted_private_key)
        ).to_bytes(),
    )
    sealed = stack.sealed(keys[1])
    stack.replace_blob(
        keys[1],
        dataclasses.replace(
            sealed, encrypted_data_key=flip_last_byte(sealed.encrypted_data_key)
        ).to_bytes(),
    )
    # the same data key seals keys[2] and keys[3]: only the AEAD binding catches this swap
    stack.replace_blob(keys[2], original[keys[3].key_id])
    stack.replace_blob(keys[3], original[keys[2].key_id])
    stack.replace_blob(keys[4], original[other_batch[0].key_id])

    # a key still unsealed in enclave memory keeps signing: the blob is not read again
    assert stack.signer.sign_hash(keys[0].key_id, digest).recover_public_key(digest) == (
        keys[0].public_key
    )
    stack.client.flush_cache()
    messages = set()
    for key in keys:
        with pytest.raises(IntegrityError) as caught:
            stack.signer.sign_hash(key.key_id, digest)
        messages.add(caught.value.message)
    assert len(messages) <= 2  # blob checks and KMS checks each say only "integrity check"
    assert all("integrity check" in message for message in messages)
    untouched = stack.signer.sign_hash(other_batch[0].key_id, digest)
    assert untouched.recover_public_key(digest) == other_batch[0].public_key

    for key in keys:
        stack.replace_blob(key, original[key.key_id])
        signature = stack.signer.sign_hash(key.key_id, digest)
        verify(key, digest, signature.r, signature.s)
