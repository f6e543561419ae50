"""PutKeyPolicy through boto3: AWS's checks and errors, persistence, and re-pinning a PCR0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signd.attestation import SimulatedNsm
from signd.kms.server import RunningServer, attestation_key_policy, start_kms_server
from tests.kms.server.conftest import error_code

pytestmark = pytest.mark.integration

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
OTHER_ADMIN = "arn:aws:iam::999999999999:root"
OTHER_PCR0 = bytes.fromhex("ab" * 48)


def statement(**extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"} | (
        extra
    )


def document(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def pinned(pcr0: bytes, *, admin: str = ROOT) -> str:
    return json.dumps(
        attestation_key_policy(enclave_principal=ROOT, admin_principal=admin, pcrs={0: pcr0})
    )


def policy_of(kms: Any, key_id: str) -> str:
    return str(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])


def test_put_replaces_the_policy_and_it_survives_a_restart(
    kms: Any, server: RunningServer, home: Path
) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    new = document(statement(Sid="Everything"))
    assert kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=new)
    assert policy_of(kms, key_id) == new
    newer = document(statement(Sid="Again"))
    kms.put_key_policy(KeyId=f"arn:aws:kms:{server.region}:{ACCOUNT}:key/{key_id}", Policy=newer)
    assert policy_of(kms, key_id) == newer

    server.stop()
    with start_kms_server(home) as restarted:
        assert policy_of(restarted.client(), key_id) == newer


@pytest.mark.parametrize(
    "policy",
    [
        "not json",
        "[]",
        json.dumps({"Statement": []}),
        document(statement(NotAction="kms:Decrypt")),
        document(statement(Resource="arn:aws:kms:*")),
        document(statement(Condition={"NumericLessThan": {"kms:CallerAccount": "1"}})),
    ],
)
def test_a_malformed_policy_is_refused_and_the_old_one_kept(kms: Any, policy: str) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    before = policy_of(kms, key_id)
    with pytest.raises(ClientError) as refused:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
    assert error_code(refused) == "MalformedPolicyDocumentException"
    assert policy_of(kms, key_id) == before


def test_unknown_key_and_policy_name(kms: Any) -> None:
    policy = document(statement())
    for missing in ("1234abcd-12ab-34cd-56ef-1234567890ab", "alias/none"):
        with pytest.raises(ClientError) as refused:
            kms.put_key_policy(KeyId=missing, PolicyName="default", Policy=policy)
        assert error_code(refused) == "NotFoundException"
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as refused:
        kms.put_key_policy(KeyId=key_id, PolicyName="custom", Policy=policy)
    assert error_code(refused) == "ValidationException"


def test_the_current_policy_must_allow_put_key_policy(kms: Any) -> None:
    denied = document(statement(), statement(Effect="Deny", Action="kms:PutKeyPolicy"))
    administered_elsewhere = pinned(OTHER_PCR0, admin=OTHER_ADMIN)
    for policy in (denied, administered_elsewhere):
        key_id = kms.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
        with pytest.raises(ClientError) as refused:
            kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=document(statement()))
        assert error_code(refused) == "AccessDeniedException"
        assert "kms:PutKeyPolicy" in refused.value.response["Error"]["Message"]
        if policy is denied:
            assert policy_of(kms, key_id) == policy


def test_the_lockout_safety_check(kms: Any) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    lockout = document(statement(Action=["kms:Decrypt", "kms:GetKeyPolicy"]))
    with pytest.raises(ClientError) as refused:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=lockout)
    assert error_code(refused) == "MalformedPolicyDocumentException"
    kms.put_key_policy(
        KeyId=key_id, PolicyName="default", Policy=lockout, BypassPolicyLockoutSafetyCheck=True
    )
    assert policy_of(kms, key_id) == lockout
    with pytest.raises(ClientError) as refused:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=document(statement()))
    assert error_code(refused) == "AccessDeniedException"


def test_re_pinning_pcr0_moves_the_data_keys_to_the_new_measurement(
    kms: Any, nsm: SimulatedNsm, recipient_key: rsa.RSAPrivateKey
) -> None:
    """What `signd kms repin` does: the old PCR0 loses the data keys, the new one gains them."""
    public_key = recipient_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attested = {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": nsm.attest(public_key=public_key),
    }
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"k" * 32)["CiphertextBlob"]
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=pinned(OTHER_PCR0))
    with pytest.raises(ClientError) as refused:
        kms.decrypt(KeyId=key_id, CiphertextBlob=blob, Recipient=attested)
    assert error_code(refused) == "AccessDeniedException"

    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=pinned(nsm.pcrs[0]))
    answer = kms.decrypt(KeyId=key_id, CiphertextBlob=blob, Recipient=attested)
    assert "Plaintext" not in answer
    assert answer["CiphertextForRecipient"]

    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=pinned(OTHER_PCR0))
    with pytest.raises(ClientError) as refused:
        kms.decrypt(KeyId=key_id, CiphertextBlob=blob, Recipient=attested)
    assert error_code(refused) == "AccessDeniedException"
