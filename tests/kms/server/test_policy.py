"""Key policy evaluation, sans I/O: AWS's Allow/Deny logic and the condition operators."""

from __future__ import annotations

import json
from typing import Any

import pytest

from signd.kms.server.errors import KmsApiError
from signd.kms.server.policy import KeyPolicy, attestation_key_policy

ACCOUNT = "111122223333"
USER = f"arn:aws:iam::{ACCOUNT}:user/app"
PCR0 = "kms:RecipientAttestation:PCR0"


def policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.parse(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def allow(**extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"} | extra


def test_explicit_deny_wins() -> None:
    document = policy(allow(), {**allow(), "Effect": "Deny", "Action": "kms:Decrypt"})
    assert document.allows(USER, ACCOUNT, "kms:Encrypt", {})
    assert not document.allows(USER, ACCOUNT, "kms:Decrypt", {})


def test_no_allow_is_a_deny() -> None:
    assert not policy(allow(Action="kms:Describe*")).allows(USER, ACCOUNT, "kms:Sign", {})


@pytest.mark.parametrize(
    ("principal", "caller", "allowed"),
    [
        ({"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, USER, True),
        ({"AWS": ACCOUNT}, USER, True),
        ({"AWS": "arn:aws:iam::999999999999:root"}, USER, False),
        ({"AWS": [USER]}, USER, True),
        ({"AWS": USER}, f"arn:aws:iam::{ACCOUNT}:user/other", False),
    ],
)
def test_principals(principal: dict[str, Any], caller: str, allowed: bool) -> None:
    assert policy(allow(Principal=principal)).allows(caller, ACCOUNT, "kms:Sign", {}) is allowed


@pytest.mark.parametrize(
    ("operator", "value", "context", "allowed"),
    [
        ("StringEqualsIgnoreCase", "ABCD", {PCR0: "abcd"}, True),
        ("StringEquals", "ABCD", {PCR0: "abcd"}, False),
        ("StringEqualsIgnoreCase", "abcd", {}, False),
        ("StringEqualsIgnoreCaseIfExists", "abcd", {}, True),
        ("StringNotEquals", "abcd", {}, True),
        ("StringNotEquals", "abcd", {PCR0: "abcd"}, False),
        ("StringLike", "ab*", {PCR0: "abcd"}, True),
        ("StringNotLike", "ab*", {PCR0: "abcd"}, False),
        ("Null", "true", {}, True),
        ("Null", "false", {}, False),
        ("Null", "false", {PCR0: "x"}, True),
    ],
)
def test_condition_operators(
    operator: str, value: str, context: dict[str, str], allowed: bool
) -> None:
    document = policy(allow(Condition={operator: {PCR0: value}}))
    assert document.allows(USER, ACCOUNT, "kms:Decrypt", context) is allowed


def test_condition_keys_are_case_insensitive_and_values_any_of() -> None:
    document = policy(allow(Condition={"StringEquals": {PCR0.upper(): ["a", "b"]}}))
    assert document.allows(USER, ACCOUNT, "kms:Decrypt", {PCR0: "b"})
    assert not document.allows(USER, ACCOUNT, "kms:Decrypt", {PCR0: "c"})


@pytest.mark.parametrize(
    "statement",
    [
        allow(Effect="Maybe"),
        allow(Principal={"Service": "x"}),
        allow(Action="s3:GetObject"),
        allow(Resource="arn:aws:kms:us-east-1:1:key/x"),
        allow(Condition={"NumericLessThan": {PCR0: "1"}}),
        allow(Condition={"Null": {PCR0: "maybe"}}),
        {**allow(), "NotAction": "kms:Sign"},
    ],
)
def test_unsupported_documents_are_malformed(statement: dict[str, Any]) -> None:
    with pytest.raises(KmsApiError) as caught:
        policy(statement)
    assert caught.value.error_type == "MalformedPolicyDocumentException"


def test_attestation_policy_denies_any_mismatch() -> None:
    pcr0, pcr1 = b"\x01" * 48, b"\x02" * 48
    document = KeyPolicy.parse(
        json.dumps(
            attestation_key_policy(
                enclave_principal=USER,
                admin_principal=f"arn:aws:iam::{ACCOUNT}:root",
                pcrs={0: pcr0, 1: pcr1},
            )
        )
    )
    good = {PCR0: pcr0.hex(), "kms:RecipientAttestation:PCR1": pcr1.hex()}
    assert document.allows(USER, ACCOUNT, "kms:Decrypt", good)
    assert not document.allows(USER, ACCOUNT, "kms:Decrypt", good | {PCR0: "00" * 48})
    assert not document.allows(USER, ACCOUNT, "kms:Decrypt", {PCR0: pcr0.hex()})
    assert not document.allows(f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT, "kms:Decrypt", {})
    assert document.allows(f"arn:aws:iam::{ACCOUNT}:user/admin", ACCOUNT, "kms:DisableKey", {})
