"""KMS custody over signd kms-server: keys, DIGEST signing, normalisation, Ethereum."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import coincurve
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from eth_account import Account

from signd.chains.ethereum.address import address_from_public_key
from signd.chains.ethereum.transactions import parse_transaction
from signd.crypto.secp256k1 import HALF_CURVE_ORDER
from signd.custody.kms import KmsKeyBackend, kms_backend_from_settings
from signd.errors import (
    AccessDenied,
    CapacityExceeded,
    ConfigurationError,
    DependencyUnavailable,
    KeyNotFound,
)
from signd.kms.server import RunningServer, start_kms_server
from signd.storage.sqlite import SqliteMetadataStore
from tests.custody.kms.conftest import RecordingClient

pytestmark = pytest.mark.integration


def test_create_keys(backend: KmsKeyBackend, client: RecordingClient) -> None:
    progress: list[int] = []
    keys = backend.create_keys(
        "ethereum", address_from_public_key, count=3, labels=["hot"], progress=progress.append
    )
    assert progress == [1, 2, 3]
    for key in keys:
        assert key.custody == "kms"
        assert key.address == address_from_public_key(key.public_key)
        kms_key_id = key.details["kms_key_id"]
        described = client.describe_key(KeyId=kms_key_id)["KeyMetadata"]
        assert (described["KeySpec"], described["KeyUsage"]) == ("ECC_SECG_P256K1", "SIGN_VERIFY")
        assert key.key_id in described["Description"]
        assert key.details["kms_key_arn"] == described["Arn"]
        assert backend.get_key(key.address) == key
        assert backend.get_key(key.key_id).public_key == key.public_key
    assert [k.key_id for k in backend.list_keys(label="hot").keys] == [k.key_id for k in keys]


def test_many_digests_verify_low_s(backend: KmsKeyBackend, client: RecordingClient) -> None:
    keys = backend.create_keys("ethereum", address_from_public_key, count=3)
    high_s = 0
    total = 300
    for index in range(total):
        key = keys[index % len(keys)]
        digest = os.urandom(32)
        signature = backend.sign_digest(key, digest)
        _, raw_s = decode_dss_signature(client.signatures[-1])
        high_s += raw_s > HALF_CURVE_ORDER
        assert 0 < signature.s <= HALF_CURVE_ORDER
        compact = signature.r.to_bytes(32, "big") + signature.s.to_bytes(32, "big")
        public = coincurve.PublicKey(key.public_key)
        assert public.verify(
            coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(compact)),
            digest,
            hasher=None,
        )
        assert signature.recover_public_key(digest) == key.public_key
    assert len(client.signatures) == total
    assert 100 < high_s < 200, high_s


def test_ethereum_transactions(backend: KmsKeyBackend) -> None:
    (key,) = backend.create_keys("ethereum", address_from_public_key)
    transactions = [
        {"nonce": 0, "gasPrice": 20 * 10**9, "gas": 21000, "value": 10**18, "chainId": 1,
         "to": "0x3535353535353535353535353535353535353535"},
        {"type": 2, "nonce": 7, "maxFeePerGas": 30 * 10**9, "maxPriorityFeePerGas": 10**9,
         "gas": 60000, "value": 1, "chainId": 11155111, "data": "0xdeadbeef",
         "to": "0x3535353535353535353535353535353535353535"},
    ]  # fmt: skip
    for _ in range(10):
        for fields in transactions:
            transaction = parse_transaction(fields)
            signature = backend.sign_digest(key, transaction.signing_digest())
            signed = transaction.assemble(signature)
            assert Account.recover_transaction(signed.raw) == key.address
            assert signed.sender == key.address


def test_unknown_and_foreign_keys(backend: KmsKeyBackend) -> None:
    with pytest.raises(KeyNotFound):
        backend.sign_digest("0x" + "00" * 20, os.urandom(32))
    with pytest.raises(KeyNotFound):
        backend.get_key("nope")


def test_disabled_kms_key_is_access_denied(backend: KmsKeyBackend, client: RecordingClient) -> None:
    (key,) = backend.create_keys("ethereum", address_from_public_key)
    client.disable_key(KeyId=key.details["kms_key_id"])
    with pytest.raises(AccessDenied, match="DisabledException"):
        backend.sign_digest(key, os.urandom(32))
    client.enable_key(KeyId=key.details["kms_key_id"])
    backend.sign_digest(key, os.urandom(32))


def test_policy_applies_to_created_keys(server: RunningServer, tmp_path: Path) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": ["kms:CreateKey", "kms:GetPublicKey", "kms:DescribeKey"], "Resource": "*"},
        ],
    }  # fmt: skip
    metadata = SqliteMetadataStore(tmp_path / "m.db")
    backend = KmsKeyBackend(metadata, client=server.client(), key_policy=json.dumps(policy))
    (key,) = backend.create_keys("ethereum", address_from_public_key)
    with pytest.raises(AccessDenied, match="AccessDeniedException"):
        backend.sign_digest(key, os.urandom(32))
    metadata.close()


def test_server_down_is_dependency_unavailable(tmp_path: Path) -> None:
    running = start_kms_server(tmp_path / "home")
    metadata = SqliteMetadataStore(tmp_path / "m.db")
    backend = kms_backend_from_settings(
        {"kms_server": True, "connect_timeout": 0.5, "read_timeout": 1, "max_attempts": 1},
        metadata,
        tmp_path / "home",
    )
    (key,) = backend.create_keys("ethereum", address_from_public_key)
    backend.check_health()
    running.stop()
    with pytest.raises(DependencyUnavailable):
        backend.sign_digest(key, os.urandom(32))
    with pytest.raises(DependencyUnavailable):
        backend.check_health()
    backend.close()
    metadata.close()


def test_settings(tmp_path: Path) -> None:
    metadata = SqliteMetadataStore(tmp_path / "m.db")
    with pytest.raises(ConfigurationError, match="unknown"):
        kms_backend_from_settings({"kms_server": True, "colour": "blue"}, metadata, tmp_path)
    with pytest.raises(ConfigurationError, match="kms-server"):
        kms_backend_from_settings({"kms_server": True}, metadata, tmp_path)
    metadata.close()


class _FailingClient:
    def __init__(self, code: str, status: int = 400) -> None:
        self.error = ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},  # type: ignore[typeddict-item]
            },
            "CreateKey",
        )

    def create_key(self, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("LimitExceededException", 400, CapacityExceeded),
        ("ThrottlingException", 400, DependencyUnavailable),
        ("KMSInternalException", 500, DependencyUnavailable),
        ("UnrecognizedClientException", 400, ConfigurationError),
        ("SomethingNew", 503, DependencyUnavailable),
    ],
)
def test_error_translation(
    tmp_path: Path, code: str, status: int, expected: type[Exception]
) -> None:
    metadata = SqliteMetadataStore(tmp_path / "m.db")
    backend = KmsKeyBackend(metadata, client=_FailingClient(code, status))
    with pytest.raises(expected) as caught:
        backend.create_keys("ethereum", address_from_public_key)
    assert caught.value.__cause__ is None
    assert backend.list_keys().keys == []
    metadata.close()


class _GarbledClient:
    """Answers like the kms-server, except that one operation's answer is ``{}``: what an
    answer with none of its fields (garbled, or not KMS's) looks like once botocore parsed it."""

    def __init__(self, client: Any, garbled: str) -> None:
        self._client = client
        self._garbled = garbled

    def __getattr__(self, name: str) -> Any:
        if name == self._garbled:
            return lambda **kwargs: {"ResponseMetadata": {}}
        return getattr(self._client, name)


@pytest.mark.parametrize("garbled", ["create_key", "get_public_key", "sign"])
def test_an_answer_without_its_fields_is_kms_unavailable(
    server: RunningServer, tmp_path: Path, garbled: str
) -> None:
    """A 503 (``dependency_unavailable``), never a KeyError's 500; no half-made key is kept."""
    metadata = SqliteMetadataStore(tmp_path / "m.db")
    made = KmsKeyBackend(metadata, client=server.client())
    [key] = made.create_keys("ethereum", address_from_public_key)
    backend = KmsKeyBackend(metadata, client=_GarbledClient(server.client(), garbled))

    def call() -> object:
        if garbled == "sign":
            return backend.sign_digest(key, b"\x01" * 32)
        return backend.create_keys("ethereum", address_from_public_key)

    with pytest.raises(DependencyUnavailable, match="KMS answered"):
        call()
    assert [info.key_id for info in backend.list_keys().keys] == [key.key_id]
    made.close()
    backend.close()
    metadata.close()
