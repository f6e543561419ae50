"""Key policies: the JSON documents AWS KMS attaches to a key, parsed and evaluated.

The supported subset is what attestation-gated keys need::

    {"Version": "2012-10-17", "Statement": [{
        "Sid": "...", "Effect": "Allow" | "Deny",
        "Principal": "*" | {"AWS": "arn" | ["arn", ...]},
        "Action": "kms:Decrypt" | ["kms:Generate*", ...],  "Resource": "*",
        "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": "hex"}}}]}

Evaluation follows AWS: an explicit Deny wins, then any Allow, otherwise the request is
denied. Action patterns and condition keys are case-insensitive; ``*`` and ``?`` are
wildcards. A principal ``arn:aws:iam::ACCOUNT:root`` (or a bare account id) stands for every
principal of that account, as the account delegation in a key policy does. A condition on a
key the request does not carry is false, except for the negated operators (true) and the
``...IfExists`` forms (true); so a policy that pins ``kms:RecipientAttestation:PCR0`` refuses
every request without an attested ``Recipient``.

A document using anything else (``NotAction``, ``NotPrincipal``, another operator) is
rejected when the key is created or its policy replaced (``PutKeyPolicy``), rather than
evaluated in a way AWS would not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

from signd.kms.server.errors import KmsApiError

MAX_POLICY_SIZE: Final = 32 * 1024
POLICY_NAME: Final = "default"
"""The only key policy name AWS KMS has (GetKeyPolicy/PutKeyPolicy ``PolicyName``)."""
POLICY_VERSION: Final = "2012-10-17"
RECIPIENT_IMAGE_SHA384: Final = "kms:RecipientAttestation:ImageSha384"
RECIPIENT_PCR_PREFIX: Final = "kms:RecipientAttestation:PCR"

_STRING_OPERATORS: Final = {
    "stringequals": (False, False, False),
    "stringnotequals": (True, False, False),
    "stringequalsignorecase": (False, True, False),
    "stringnotequalsignorecase": (True, True, False),
    "stringlike": (False, False, True),
    "stringnotlike": (True, False, True),
}
"""Operator → (negated, ignore case, wildcards)."""
_STATEMENT_FIELDS: Final = frozenset(
    {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}
)


def _malformed(message: str) -> KmsApiError:
    return KmsApiError("MalformedPolicyDocumentException", message)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise _malformed(f"{what} must be a string or a non-empty list of strings")
    return tuple(items)


@dataclass(frozen=True, slots=True)
class Condition:
    operator: str
    key: str
    values: tuple[str, ...]

    def holds(self, context: Mapping[str, str]) -> bool:
        base = self.operator.removesuffix("ifexists")
        actual = context.get(self.key)
        if base == "null":
            return (actual is None) == (self.values[0].lower() == "true")
        negated, ignore_case, wildcards = _STRING_OPERATORS[base]
        if actual is None:
            return negated or base != self.operator
        if ignore_case:
            actual = actual.lower()
        matched = any(
            fnmatchcase(actual, value.lower() if ignore_case else value)
            if wildcards
            else actual == (value.lower() if ignore_case else value)
            for value in self.values
        )
        return matched != negated


@dataclass(frozen=True, slots=True)
class Statement:
    allow: bool
    principals: tuple[str, ...]
    """``*`` or principal ARNs / account ids."""
    actions: tuple[str, ...]
    conditions: tuple[Condition, ...]

    def applies(
        self, principal_arn: str, account: str, action: str, context: Mapping[str, str]
    ) -> bool:
        return (
            any(_principal_matches(p, principal_arn, account) for p in self.principals)
            and any(fnmatchcase(action.lower(), pattern.lower()) for pattern in self.actions)
            and all(condition.holds(context) for condition in self.conditions)
        )


def _principal_matches(pattern: str, principal_arn: str, account: str) -> bool:
    if pattern == "*":
        return True
    if pattern in (account, f"arn:aws:iam::{account}:root"):
        return principal_arn.startswith(f"arn:aws:iam::{account}:")
    return pattern == principal_arn


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A parsed key policy; ``document`` is the JSON text as given (GetKeyPolicy returns it)."""

    document: str
    statements: tuple[Statement, ...]

    @classmethod
    def parse(cls, document: str) -> KeyPolicy:
        if len(document.encode()) > MAX_POLICY_SIZE:
            raise _malformed(f"policy is larger than {MAX_POLICY_SIZE} bytes")
        try:
            body = json.loads(document)
        except (ValueError, RecursionError):
            raise _malformed("policy is not valid JSON") from None
        if not isinstance(body, dict):
            raise _malformed("policy must be a JSON object")
        raw = body.get("Statement")
        statements = [raw] if isinstance(raw, dict) else raw
        if not isinstance(statements, list) or not statements:
            raise _malformed("policy needs a non-empty Statement list")
        return cls(document, tuple(_parse_statement(item) for item in statements))

    def allows(
        self, principal_arn: str, account: str, action: str, context: Mapping[str, str]
    ) -> bool:
        """Whether ``principal_arn`` may do ``action`` (``kms:Decrypt``) in ``context``."""
        lowered = {key.lower(): value for key, value in context.items()}
        applicable = [
            statement
            for statement in self.statements
            if statement.applies(principal_arn, account, action, lowered)
        ]
        return any(s.allow for s in applicable) and not any(not s.allow for s in applicable)


def _parse_statement(item: Any) -> Statement:
    if not isinstance(item, dict):
        raise _malformed("each statement must be a JSON object")
    unknown = sorted(set(item) - _STATEMENT_FIELDS)
    if unknown:
        raise _malformed(f"unsupported statement element {unknown[0]}")
    effect = item.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _malformed("Effect must be Allow or Deny")
    principal = item.get("Principal")
    if principal == "*":
        principals: tuple[str, ...] = ("*",)
    elif isinstance(principal, dict) and set(principal) == {"AWS"}:
        principals = _strings(principal["AWS"], "Principal.AWS")
    else:
        raise _malformed('Principal must be "*" or {"AWS": ...}')
    actions = _strings(item.get("Action"), "Action")
    if not all(action.lower().startswith("kms:") or action == "*" for action in actions):
        raise _malformed("actions must be kms:... actions")
    resources = _strings(item.get("Resource", "*"), "Resource")
    if resources != ("*",):
        raise _malformed('Resource in a key policy must be "*"')
    return Statement(
        allow=effect == "Allow",
        principals=principals,
        actions=actions,
        conditions=_parse_conditions(item.get("Condition", {})),
    )


def _parse_conditions(block: Any) -> tuple[Condition, ...]:
    if not isinstance(block, dict):
        raise _malformed("Condition must be a JSON object")
    conditions = []
    for operator, tests in block.items():
        name = operator.lower() if isinstance(operator, str) else ""
        base = name.removesuffix("ifexists")
        if base not in _STRING_OPERATORS and name != "null":
            raise _malformed(f"unsupported condition operator {operator!r}")
        if not isinstance(tests, dict) or not tests:
            raise _malformed(f"{operator} must map condition keys to values")
        for key, values in tests.items():
            strings = _strings(values, f"{operator} values")
            if name == "null" and (
                len(strings) != 1 or strings[0].lower() not in ("true", "false")
            ):
                raise _malformed("Null takes exactly one of true or false")
            conditions.append(Condition(name, key.lower(), strings))
    return tuple(conditions)


def default_key_policy(account: str) -> str:
    """The policy AWS gives a key created without one: the account may do everything."""
    return json.dumps(
        {
            "Version": POLICY_VERSION,
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


ATTESTED_ACTIONS: Final = ("kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom")
ADMIN_ACTIONS: Final = (
    "kms:Create*",
    "kms:Describe*",
    "kms:Enable*",
    "kms:List*",
    "kms:Put*",
    "kms:Update*",
    "kms:Revoke*",
    "kms:Disable*",
    "kms:Get*",
    "kms:Delete*",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)


def attestation_key_policy(
    *,
    enclave_principal: str,
    admin_principal: str,
    pcrs: Mapping[int, bytes],
    image_sha384: bytes | None = None,
) -> dict[str, Any]:
    """A key policy that releases data keys only to an enclave with these measurements.

    Three statements: administrators manage the key but cannot use it; the enclave's role may
    Decrypt and GenerateDataKey only with an attestation document whose PCRs match; and an
    explicit Deny refuses those actions to everyone else, including requests without a
    ``Recipient`` (a missing attestation key makes the negated condition true).
    """
    measurements: dict[str, str] = {
        f"{RECIPIENT_PCR_PREFIX}{index}": value.hex() for index, value in sorted(pcrs.items())
    }
    if image_sha384 is not None:
        measurements[RECIPIENT_IMAGE_SHA384] = image_sha384.hex()
    if not measurements:
        raise ValueError("an attestation policy needs at least one measurement")
    return {
        "Version": POLICY_VERSION,
        "Id": "signd-attested-data-keys",
        "Statement": [
            {
                "Sid": "KeyAdministration",
                "Effect": "Allow",
                "Principal": {"AWS": admin_principal},
                "Action": list(ADMIN_ACTIONS),
                "Resource": "*",
            },
            {
                "Sid": "EnclaveUseWithAttestation",
                "Effect": "Allow",
                "Principal": {"AWS": enclave_principal},
                "Action": list(ATTESTED_ACTIONS),
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": measurements},
            },
            *(
                {
                    "Sid": f"DenyUnattested{key.rsplit(':', 1)[1]}",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": list(ATTESTED_ACTIONS),
                    "Resource": "*",
                    "Condition": {"StringNotEqualsIgnoreCase": {key: value}},
                }
                for key, value in measurements.items()
            ),
        ],
    }
