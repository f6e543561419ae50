"""boto3 → signd kms-server: every operation, and the AWS-shaped error for each misuse."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signd.kms.server import RunningServer
from tests.kms.server.conftest import error_code

pytestmark = pytest.mark.integration

CONTEXT = {"key_id": "k-1", "address": "0xabc"}


def symmetric(kms: Any) -> str:
    return str(kms.create_key(Description="test")["KeyMetadata"]["KeyId"])


def secp256k1(kms: Any) -> str:
    metadata = kms.create_key(KeySpec="ECC_SECG_P256K1", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    return str(metadata["KeyId"])


def test_create_describe_list(kms: Any, server: RunningServer) -> None:
    created = kms.create_key(
        Description="signd data keys", Tags=[{"TagKey": "app", "TagValue": "signd"}]
    )["KeyMetadata"]
    assert created["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert created["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert created["KeyState"] == "Enabled"
    assert created["Arn"] == f"arn:aws:kms:{server.region}:111122223333:key/{created['KeyId']}"
    described = kms.describe_key(KeyId=created["Arn"])["KeyMetadata"]
    assert described["KeyId"] == created["KeyId"]
    assert described["Description"] == "signd data keys"
    assert described["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    ecc = kms.describe_key(KeyId=secp256k1(kms))["KeyMetadata"]
    assert (ecc["KeySpec"], ecc["SigningAlgorithms"]) == ("ECC_SECG_P256K1", ["ECDSA_SHA_256"])
    listed = kms.list_keys()["Keys"]
    assert [key["KeyId"] for key in listed] == [created["KeyId"], ecc["KeyId"]]


def test_list_keys_pages(kms: Any) -> None:
    ids = [symmetric(kms) for _ in range(5)]
    seen: list[str] = []
    page = kms.list_keys(Limit=2)
    while True:
        seen += [key["KeyId"] for key in page["Keys"]]
        if not page["Truncated"]:
            break
        page = kms.list_keys(Limit=2, Marker=page["NextMarker"])
    assert seen == ids
    with pytest.raises(ClientError) as caught:
        kms.list_keys(Marker="nonsense")
    assert error_code(caught) == "InvalidMarkerException"


def test_alias_resolves(kms: Any) -> None:
    key_id = symmetric(kms)
    kms.create_alias(AliasName="alias/signd", TargetKeyId=key_id)
    assert kms.describe_key(KeyId="alias/signd")["KeyMetadata"]["KeyId"] == key_id
    with pytest.raises(ClientError) as caught:
        kms.create_alias(AliasName="alias/signd", TargetKeyId=key_id)
    assert error_code(caught) == "AlreadyExistsException"


@pytest.mark.parametrize(
    ("spec", "usage"),
    [("SYMMETRIC_DEFAULT", "SIGN_VERIFY"), ("ECC_SECG_P256K1", "ENCRYPT_DECRYPT")],
)
def test_unsupported_key_type_is_a_validation_error(kms: Any, spec: str, usage: str) -> None:
    with pytest.raises(ClientError) as caught:
        kms.create_key(KeySpec=spec, KeyUsage=usage)
    assert error_code(caught) == "ValidationException"
    assert kms.list_keys()["Keys"] == []


def test_data_key_round_trip(kms: Any) -> None:
    key_id = symmetric(kms)
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert len(data_key["Plaintext"]) == 32
    assert data_key["KeyId"].endswith(key_id)
    plain = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert plain["Plaintext"] == data_key["Plaintext"]
    assert plain["KeyId"] == data_key["KeyId"]
    assert len(kms.generate_data_key(KeyId=key_id, NumberOfBytes=64)["Plaintext"]) == 64
    assert len(kms.generate_data_key(KeyId=key_id, KeySpec="AES_128")["Plaintext"]) == 16


@pytest.mark.parametrize(
    "arguments",
    [{}, {"KeySpec": "AES_256", "NumberOfBytes": 32}, {"NumberOfBytes": 1025}],
)
def test_data_key_size_is_validated(kms: Any, arguments: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(KeyId=symmetric(kms), **arguments)
    assert error_code(caught) == "ValidationException"


def test_encrypt_decrypt_with_context(kms: Any) -> None:
    key_id = symmetric(kms)
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"secret", EncryptionContext=CONTEXT)
    assert blob["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    answer = kms.decrypt(
        CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=CONTEXT, KeyId=key_id
    )
    assert answer["Plaintext"] == b"secret"


@pytest.mark.parametrize("context", [{"key_id": "k-2", "address": "0xabc"}, {}, None])
def test_wrong_encryption_context_is_invalid_ciphertext(
    kms: Any, context: dict[str, str] | None
) -> None:
    blob = kms.encrypt(KeyId=symmetric(kms), Plaintext=b"secret", EncryptionContext=CONTEXT)
    arguments = {"EncryptionContext": context} if context is not None else {}
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], **arguments)
    assert error_code(caught) == "InvalidCiphertextException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_ciphertext_from_another_key(kms: Any) -> None:
    first, second = symmetric(kms), symmetric(kms)
    blob = kms.encrypt(KeyId=first, Plaintext=b"secret")["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, KeyId=second)
    assert error_code(caught) == "IncorrectKeyException"
    forged = blob[:4] + second.encode() + blob[40:]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=forged)
    assert error_code(caught) == "InvalidCiphertextException"


@pytest.mark.parametrize("position", [0, 10, 45, -1])
def test_tampered_ciphertext(kms: Any, position: int) -> None:
    blob = bytearray(kms.encrypt(KeyId=symmetric(kms), Plaintext=b"secret")["CiphertextBlob"])
    blob[position] ^= 0x01
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=bytes(blob))
    assert error_code(caught) in {"InvalidCiphertextException", "NotFoundException"}


@pytest.mark.parametrize(
    "call",
    [
        lambda kms, ref: kms.describe_key(KeyId=ref),
        lambda kms, ref: kms.generate_data_key(KeyId=ref, KeySpec="AES_256"),
        lambda kms, ref: kms.sign(
            KeyId=ref, Message=b"m", MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
        ),
        lambda kms, ref: kms.get_public_key(KeyId=ref),
        lambda kms, ref: kms.disable_key(KeyId=ref),
    ],
)
@pytest.mark.parametrize(
    "reference",
    [
        "11111111-2222-3333-4444-555555555555",
        "alias/missing",
        "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555",
        "arn:aws:kms:eu-west-1:999999999999:key/11111111-2222-3333-4444-555555555555",
    ],
)
def test_unknown_key_is_not_found(kms: Any, call: Any, reference: str) -> None:
    with pytest.raises(ClientError) as caught:
        call(kms, reference)
    assert error_code(caught) == "NotFoundException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_disabled_key(kms: Any) -> None:
    key_id, signing = symmetric(kms), secp256k1(kms)
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=key_id)
    kms.disable_key(KeyId=signing)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    calls: list[Callable[[], Any]] = [
        lambda: kms.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        lambda: kms.encrypt(KeyId=key_id, Plaintext=b"x"),
        lambda: kms.decrypt(CiphertextBlob=blob),
        lambda: kms.get_public_key(KeyId=signing),
        lambda: kms.sign(
            KeyId=signing, Message=b"m", MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
        ),
    ]
    for call in calls:
        with pytest.raises(ClientError) as caught:
            call()
        assert error_code(caught) == "DisabledException"
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"] is True


def _public_key(kms: Any, key_id: str) -> ec.EllipticCurvePublicKey:
    answer = kms.get_public_key(KeyId=key_id)
    assert answer["KeySpec"] == "ECC_SECG_P256K1"
    assert answer["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    key = serialization.load_der_public_key(answer["PublicKey"])
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256K1)
    return key


def test_sign_digest_signs_the_given_bytes(kms: Any) -> None:
    key_id = secp256k1(kms)
    public = _public_key(kms, key_id)
    digest = os.urandom(32)
    signature = kms.sign(
        KeyId=key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(signature, digest, ec.ECDSA(hashes.SHA256()))


def test_sign_raw_hashes_with_sha256(kms: Any) -> None:
    key_id = secp256k1(kms)
    public = _public_key(kms, key_id)
    message = b"a message longer than thirty-two bytes, hashed by KMS"
    signature = kms.sign(
        KeyId=key_id, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    verified = kms.verify(
        KeyId=key_id,
        Message=hashlib.sha256(message).digest(),
        MessageType="DIGEST",
        Signature=signature,
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert verified["SignatureValid"] is True


def test_verify_rejects_a_wrong_signature(kms: Any) -> None:
    key_id = secp256k1(kms)
    digest = os.urandom(32)
    signature = kms.sign(
        KeyId=key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    for message, sig in [(os.urandom(32), signature), (digest, b"\x30\x02\x01\x01")]:
        with pytest.raises(ClientError) as caught:
            kms.verify(
                KeyId=key_id,
                Message=message,
                MessageType="DIGEST",
                Signature=sig,
                SigningAlgorithm="ECDSA_SHA_256",
            )
        assert error_code(caught) == "KMSInvalidSignatureException"


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ({"Message": b"\x01" * 31, "MessageType": "DIGEST"}, "ValidationException"),
        ({"Message": b"\x01" * 33, "MessageType": "DIGEST"}, "ValidationException"),
        ({"Message": b"m", "SigningAlgorithm": "ECDSA_SHA_384"}, "InvalidKeyUsageException"),
    ],
)
def test_sign_arguments_are_checked(kms: Any, arguments: dict[str, Any], code: str) -> None:
    request = {"MessageType": "RAW", "SigningAlgorithm": "ECDSA_SHA_256"} | arguments
    with pytest.raises(ClientError) as caught:
        kms.sign(KeyId=secp256k1(kms), **request)
    assert error_code(caught) == code


def test_key_usage_is_enforced(kms: Any) -> None:
    key_id, signing = symmetric(kms), secp256k1(kms)
    with pytest.raises(ClientError) as caught:
        kms.sign(KeyId=key_id, Message=b"m", MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
    assert error_code(caught) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(KeyId=signing, KeySpec="AES_256")
    assert error_code(caught) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as caught:
        kms.get_public_key(KeyId=key_id)
    assert error_code(caught) == "UnsupportedOperationException"


def _client(server: RunningServer, **overrides: str) -> Any:
    access_key_id, secret = server.credentials
    options = {
        "endpoint_url": server.endpoint,
        "region_name": server.region,
        "aws_access_key_id": access_key_id,
        "aws_secret_access_key": str(secret.reveal()),
    } | overrides
    return boto3.session.Session().client("kms", **options)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"aws_secret_access_key": "not-the-secret"}, "InvalidSignatureException"),
        ({"aws_access_key_id": "AKIAUNKNOWNUNKNOWN00"}, "UnrecognizedClientException"),
        ({"region_name": "eu-west-1"}, "InvalidSignatureException"),
    ],
)
def test_wrong_credentials(server: RunningServer, overrides: dict[str, str], code: str) -> None:
    client = _client(server, **overrides)
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert error_code(caught) == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError):
        client.create_key()
    assert server.client().list_keys()["Keys"] == []
