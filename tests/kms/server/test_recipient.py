"""Recipient: attested GenerateDataKey/Decrypt, CMS EnvelopedData, PCR-conditioned policies."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms as asn1_cms  # type: ignore[import-untyped]
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from typer.testing import CliRunner

from signd.attestation import SimulatedNsm
from signd.cli.kms import kms_app
from signd.errors import IntegrityError
from signd.kms.server import open_for_recipient
from tests.kms.server.conftest import error_code

pytestmark = pytest.mark.integration

ACCOUNT = "111122223333"
PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:user/signd-kms-server"


def spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def recipient(nsm: SimulatedNsm, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": nsm.attest(public_key=spki(key)),
    }


def decrypt_with_asn1crypto(ciphertext: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """An independent CMS reader (asn1crypto + pyca), to check the structure, not just our code."""
    info = asn1_cms.ContentInfo.load(ciphertext)
    assert info["content_type"].native == "enveloped_data"
    enveloped = info["content"]
    assert enveloped["version"].native == "v2"
    (recipient_info,) = list(enveloped["recipient_infos"])
    transport = recipient_info.chosen
    assert transport["version"].native == "v2"
    assert transport["rid"].name == "subject_key_identifier"
    algorithm = transport["key_encryption_algorithm"]
    assert algorithm["algorithm"].native == "rsaes_oaep"
    assert algorithm["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert algorithm["parameters"]["mask_gen_algorithm"]["parameters"]["algorithm"].native == (
        "sha256"
    )
    content_key = key.decrypt(
        transport["encrypted_key"].native,
        asymmetric_padding.OAEP(
            mgf=asymmetric_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    )
    content = enveloped["encrypted_content_info"]
    assert content["content_type"].native == "data"
    assert content["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    iv = content["content_encryption_algorithm"]["parameters"].native
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(content["encrypted_content"].native) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def nitro_sdk_walk(ciphertext: bytes) -> tuple[bytes, bytes, bytes]:
    """The token walk of aws-nitro-enclaves-sdk-c ``aws_cms_parse_enveloped_data``.

    It reads headers only for the indefinite-length ContentInfo, [0], EnvelopedData and
    EncryptedContentInfo, whole elements for the rest; a definite-length outer frame breaks it.
    Returns (encrypted key, iv, encrypted content).
    """
    position = 0

    def header() -> tuple[int, int | None]:
        nonlocal position
        tag, first = ciphertext[position], ciphertext[position + 1]
        position += 2
        if first == 0x80:
            return tag, None
        if first & 0x80:
            count = first & 0x7F
            size = int.from_bytes(ciphertext[position : position + count], "big")
            position += count
            return tag, size
        return tag, first

    def element(expected: int) -> bytes:
        nonlocal position
        tag, size = header()
        assert tag == expected and size is not None
        content = ciphertext[position : position + size]
        position += size
        return content

    assert header() == (0x30, None)
    assert element(0x06) == bytes.fromhex("2a864886f70d010703")
    assert header() == (0xA0, None)
    assert header() == (0x30, None)
    assert element(0x02) == b"\x02"
    recipient_set = element(0x31)
    assert header() == (0x30, None)
    assert element(0x06) == bytes.fromhex("2a864886f70d010701")
    algorithm = element(0x30)
    content = element(0x80)
    assert ciphertext[position:] == b"\x00\x00" * 4
    assert algorithm[:11] == bytes.fromhex("060960864801650304012a")
    iv = algorithm[13:]
    assert algorithm[11:13] == b"\x04\x10" and len(iv) == 16
    encrypted_key = recipient_set[-256:]
    return encrypted_key, iv, content


def test_generate_data_key_for_recipient(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    answer = kms.generate_data_key(
        KeyId=key_id,
        KeySpec="AES_256",
        EncryptionContext={"address": "0xabc"},
        Recipient=recipient(nsm, recipient_key),
    )
    assert "Plaintext" not in answer
    sealed = answer["CiphertextForRecipient"]
    data_key = open_for_recipient(sealed, recipient_key)
    assert len(data_key) == 32
    assert decrypt_with_asn1crypto(sealed, recipient_key) == data_key
    plain = kms.decrypt(
        CiphertextBlob=answer["CiphertextBlob"], EncryptionContext={"address": "0xabc"}
    )
    assert plain["Plaintext"] == data_key
    encrypted_key, iv, content = nitro_sdk_walk(sealed)
    content_key = recipient_key.decrypt(
        encrypted_key,
        asymmetric_padding.OAEP(
            mgf=asymmetric_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    )
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(content) + decryptor.finalize()
    assert padded[:32] == data_key and padded[32:] == b"\x10" * 16


def test_decrypt_for_recipient(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    answer = kms.decrypt(
        CiphertextBlob=data_key["CiphertextBlob"], Recipient=recipient(nsm, recipient_key)
    )
    assert "Plaintext" not in answer
    assert (
        open_for_recipient(answer["CiphertextForRecipient"], recipient_key) == data_key["Plaintext"]
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(IntegrityError):
        open_for_recipient(answer["CiphertextForRecipient"], other)


def _policy(condition_key: str, value: str, operator: str = "StringEqualsIgnoreCase") -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                    "Action": ["kms:DescribeKey", "kms:Encrypt"],
                    "Resource": "*",
                },
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": PRINCIPAL},
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                    "Resource": "*",
                    "Condition": {operator: {condition_key: value}},
                },
            ],
        }
    )


@pytest.mark.parametrize(
    "condition_key", ["kms:RecipientAttestation:PCR0", "kms:RecipientAttestation:ImageSha384"]
)
def test_policy_pinning_pcr0(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey, condition_key: str
) -> None:
    measured = nsm.pcrs[0].hex().upper()
    key_id = kms.create_key(Policy=_policy(condition_key, measured))["KeyMetadata"]["KeyId"]
    answer = kms.generate_data_key(
        KeyId=key_id, KeySpec="AES_256", Recipient=recipient(nsm, recipient_key)
    )
    data_key = open_for_recipient(answer["CiphertextForRecipient"], recipient_key)
    again = kms.decrypt(
        CiphertextBlob=answer["CiphertextBlob"], Recipient=recipient(nsm, recipient_key)
    )
    assert open_for_recipient(again["CiphertextForRecipient"], recipient_key) == data_key
    calls: list[Callable[[], Any]] = [
        lambda: kms.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        lambda: kms.decrypt(CiphertextBlob=answer["CiphertextBlob"]),
    ]
    for call in calls:
        with pytest.raises(ClientError) as caught:
            call()
        assert error_code(caught) == "AccessDeniedException"


def test_policy_with_another_pcr0_denies(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    other = "ab" * 48
    key_id = kms.create_key(Policy=_policy("kms:RecipientAttestation:PCR0", other))["KeyMetadata"][
        "KeyId"
    ]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x" * 32)["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", Recipient=recipient(nsm, recipient_key)
        )
    assert error_code(caught) == "AccessDeniedException"
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, Recipient=recipient(nsm, recipient_key))
    assert error_code(caught) == "AccessDeniedException"


def test_untrusted_root_is_denied(
    kms: Any, tmp_path: Path, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    impostor = SimulatedNsm(tmp_path / "impostor-ca", config=b"kms-server-tests")
    assert impostor.pcrs[0] == nsm.pcrs[0]
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    nsm.attest()
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", Recipient=recipient(impostor, recipient_key)
        )
    assert error_code(caught) == "AccessDeniedException"
    assert "attestation" in caught.value.response["Error"]["Message"]


def test_stale_document_is_denied(
    kms: Any, home: Path, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=30)
    stale = SimulatedNsm(home / "attestation" / "dev-ca", clock=lambda: past)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", Recipient=recipient(stale, recipient_key)
        )
    assert error_code(caught) == "AccessDeniedException"


def test_malformed_recipients_are_validation_errors(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases = [
        {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b"not cbor"},
        {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": nsm.attest()},
        {
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": nsm.attest(
                public_key=spki(ec.generate_private_key(ec.SECP256R1()))
            ),
        },
        {
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": nsm.attest(public_key=spki(small)),
        },
        {
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": nsm.attest(public_key=b"\x30\x03\x02\x01\x01"),
        },
    ]
    for case in cases:
        with pytest.raises(ClientError) as caught:
            kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", Recipient=case)
        assert error_code(caught) == "ValidationException", case


def test_cli_policy_gates_a_kms_server_key(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey, home: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        kms_app,
        ["kms", "policy", "--enclave-role", PRINCIPAL, "--pcr0", nsm.pcrs[0].hex(),
         "--pcr1", nsm.pcrs[1].hex()],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    policy = json.loads(result.output)
    statements = {statement["Sid"]: statement for statement in policy["Statement"]}
    assert statements["EnclaveUseWithAttestation"]["Condition"] == {
        "StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:PCR0": nsm.pcrs[0].hex(),
            "kms:RecipientAttestation:PCR1": nsm.pcrs[1].hex(),
        }
    }
    assert statements["KeyAdministration"]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    key_id = kms.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    answer = kms.generate_data_key(
        KeyId=key_id, KeySpec="AES_256", Recipient=recipient(nsm, recipient_key)
    )
    assert len(open_for_recipient(answer["CiphertextForRecipient"], recipient_key)) == 32
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=answer["CiphertextBlob"])
    assert error_code(caught) == "AccessDeniedException"
    modified = tmp_path / "modified-package"
    modified.mkdir()
    (modified / "errors.py").write_text("# other enclave code\n")
    other = SimulatedNsm(home / "attestation" / "dev-ca", package_root=modified)
    assert other.pcrs[0] != nsm.pcrs[0]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(
            CiphertextBlob=answer["CiphertextBlob"], Recipient=recipient(other, recipient_key)
        )
    assert error_code(caught) == "AccessDeniedException"


@pytest.mark.parametrize(
    "arguments",
    [
        ["--enclave-role", PRINCIPAL],
        ["--enclave-role", PRINCIPAL, "--pcr0", "abcd"],
        ["--enclave-role", "not-an-arn", "--pcr0", "ab" * 48],
    ],
)
def test_cli_policy_refuses_bad_input(arguments: list[str]) -> None:
    result = CliRunner().invoke(kms_app, ["kms", "policy", *arguments])
    assert result.exit_code == 1
