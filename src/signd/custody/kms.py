"""KMS custody: every address is its own asymmetric ``ECC_SECG_P256K1`` KMS key.

The private key is generated inside KMS (AWS KMS, or ``signd kms-server`` through the same
boto3 client) and never leaves it. signd asks for the public key once (``GetPublicKey``, DER
SubjectPublicKeyInfo), derives the address with the caller's ``address_of``, and records the
KMS key id in a :class:`~signd.storage.base.MetadataStore`. Signing is
``Sign(MessageType=DIGEST, SigningAlgorithm=ECDSA_SHA_256)`` over the 32-byte digest; KMS
answers DER, possibly high-S, and the base class normalises it (low-S, recovery id found
against the recorded public key).

AWS quotas bound this backend (see ``docs/KMS.md``): key creation is rate-limited and keys
per account and Region are capped, and Sign shares the ECC request-rate quota.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.config import config_number
from signd.crypto.secp256k1 import RecoverableSignature, compress_public_key
from signd.custody.base import (
    AddressDeriver,
    KeyInfo,
    check_labels,
    new_key_id,
    utc_now,
)
from signd.custody.metadata import MetadataBackedBackend, info_from_record
from signd.errors import (
    AccessDenied,
    CapacityExceeded,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyNotFound,
    SigndError,
)
from signd.kms.aws import answer_field, new_kms_client
from signd.storage.base import KeyRecord, MetadataStore

KEY_SPEC: Final = "ECC_SECG_P256K1"
KEY_USAGE: Final = "SIGN_VERIFY"
SIGNING_ALGORITHM: Final = "ECDSA_SHA_256"
DETAIL_KEY_ID: Final = "kms_key_id"
DETAIL_KEY_ARN: Final = "kms_key_arn"
TAG_KEY_ID: Final = "signd:key-id"
TAG_CHAIN: Final = "signd:chain"
SERVER_INFO_FILE: Final = "kms-server.json"

_ERRORS_BY_CODE: Final[dict[str, type[SigndError]]] = {
    "AccessDeniedException": AccessDenied,
    "NotFoundException": KeyNotFound,
    "DisabledException": AccessDenied,
    "KMSInvalidStateException": AccessDenied,
    "InvalidKeyUsageException": IntegrityError,
    "UnrecognizedClientException": ConfigurationError,
    "InvalidSignatureException": ConfigurationError,
    "IncompleteSignatureException": ConfigurationError,
    "MalformedPolicyDocumentException": ConfigurationError,
    "ValidationException": ConfigurationError,
    "LimitExceededException": CapacityExceeded,
    "ThrottlingException": DependencyUnavailable,
    "KMSInternalException": DependencyUnavailable,
    "DependencyTimeoutException": DependencyUnavailable,
    "KeyUnavailableException": DependencyUnavailable,
}
_CONFIGURATION_ERRORS: Final = (
    NoCredentialsError,
    PartialCredentialsError,
    NoRegionError,
    ParamValidationError,
)
_SETTINGS: Final = frozenset(
    {
        "type",
        "region",
        "endpoint_url",
        "kms_server",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
        "key_policy_file",
    }
)


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Turn botocore errors raised by ``operation`` into signd errors."""
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        fallback = DependencyUnavailable if status >= 500 else ConfigurationError
        error_class = _ERRORS_BY_CODE.get(code, fallback)
        raise error_class(f"KMS {operation} failed: {code}") from None
    except _CONFIGURATION_ERRORS as exc:
        raise ConfigurationError(
            f"KMS {operation} is misconfigured: {type(exc).__name__}"
        ) from None
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"KMS {operation} unavailable: {type(exc).__name__}") from None


def public_key_from_spki(der: bytes) -> bytes:
    """The compressed SEC1 public key of a DER SubjectPublicKeyInfo on secp256k1."""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise IntegrityError("KMS returned a public key that is not DER SPKI") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256K1):
        raise IntegrityError("KMS returned a public key that is not on secp256k1")
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return compress_public_key(point)


class KmsKeyBackend(MetadataBackedBackend):
    """secp256k1 keys held as asymmetric KMS keys, one per address."""

    custody_type = "kms"

    def __init__(
        self,
        metadata: MetadataStore,
        *,
        client: Any | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
        key_policy: str | None = None,
    ) -> None:
        """Use ``client`` (a boto3 KMS client), or build one; credentials default to boto3's."""
        self._client = (
            client
            if client is not None
            else new_kms_client(
                region=region,
                endpoint_url=endpoint_url,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
                access_key_id=access_key_id,
                secret_access_key=secret_access_key,
            )
        )
        super().__init__(metadata)
        self._key_policy = key_policy

    def __repr__(self) -> str:
        return f"KmsKeyBackend(endpoint={self._client.meta.endpoint_url!r})"

    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        """Create ``count`` KMS keys, recording each one as soon as it exists.

        A quota hit (LimitExceededException) raises CapacityExceeded; the keys made before it
        stay recorded.
        """
        if not isinstance(count, int) or count < 1:
            raise InvalidField("count must be a positive integer", field="count")
        labels = check_labels(labels)
        created: list[KeyInfo] = []
        for _ in range(count):
            key_id = new_key_id()
            request: dict[str, Any] = {
                "KeySpec": KEY_SPEC,
                "KeyUsage": KEY_USAGE,
                "Description": f"signd {chain} signing key {key_id}",
                "Tags": [
                    {"TagKey": TAG_KEY_ID, "TagValue": key_id},
                    {"TagKey": TAG_CHAIN, "TagValue": chain},
                ],
            }
            if self._key_policy is not None:
                request["Policy"] = self._key_policy
            with _translated("CreateKey"):
                metadata = answer_field(
                    self._client.create_key(**request), "KeyMetadata", "CreateKey"
                )
            kms_key_id = str(answer_field(metadata, "KeyId", "CreateKey"))
            kms_arn = str(metadata.get("Arn", ""))
            with _translated("GetPublicKey"):
                answer = self._client.get_public_key(KeyId=kms_key_id)
            if answer.get("KeySpec", KEY_SPEC) != KEY_SPEC:
                raise IntegrityError(f"KMS key {kms_key_id} is not {KEY_SPEC}")
            public_key = public_key_from_spki(answer_field(answer, "PublicKey", "GetPublicKey"))
            record = KeyRecord(
                key_id=key_id,
                chain=chain,
                address=address_of(public_key),
                public_key=public_key,
                custody=self.custody_type,
                created_at=utc_now(),
                labels=labels,
                details=((DETAIL_KEY_ID, kms_key_id), (DETAIL_KEY_ARN, kms_arn)),
            )
            self._metadata.add([record])
            created.append(info_from_record(record))
            if progress is not None:
                progress(len(created))
        return created

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes | RecoverableSignature:
        kms_key_id = key.details.get(DETAIL_KEY_ID)
        if not kms_key_id:
            raise IntegrityError(f"KMS key {key.key_id} has no KMS key id in its metadata")
        with _translated("Sign"):
            answer = self._client.sign(
                KeyId=kms_key_id,
                Message=digest,
                MessageType="DIGEST",
                SigningAlgorithm=SIGNING_ALGORITHM,
            )
        signature = answer_field(answer, "Signature", "Sign")
        if not isinstance(signature, bytes):
            raise IntegrityError("KMS returned a signature that is not bytes")
        return signature

    def check_health(self) -> None:
        """One cheap authenticated call: ListKeys with Limit=1; then the metadata store."""
        with _translated("ListKeys"):
            self._client.list_keys(Limit=1)
        super().check_health()

    def close(self) -> None:
        self._client.close()
        super().close()


def kms_backend_from_settings(
    settings: Mapping[str, Any], metadata: MetadataStore, home: Path
) -> KmsKeyBackend:
    """Build the backend from the ``[kms_custody]`` table.

    ``kms_server = true`` takes endpoint, region and credentials from the
    ``kms-server.json`` a local ``signd kms-server`` wrote into ``home``; otherwise boto3's
    usual credential chain and ``region`` / ``endpoint_url`` apply.
    """
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigurationError(f"unknown KMS custody settings: {', '.join(unknown)}")
    options: dict[str, Any] = {
        "region": settings.get("region"),
        "endpoint_url": settings.get("endpoint_url"),
        "connect_timeout": config_number("kms_custody", settings, "connect_timeout", 2.0),
        "read_timeout": config_number("kms_custody", settings, "read_timeout", 5.0),
        "max_attempts": int(config_number("kms_custody", settings, "max_attempts", 2)),
    }
    if settings.get("kms_server"):
        path = Path(home) / SERVER_INFO_FILE
        try:
            info = json.loads(path.read_text())
            options |= {
                "endpoint_url": str(info["endpoint"]),
                "region": str(info["region"]),
                "access_key_id": str(info["access_key_id"]),
                "secret_access_key": str(info["secret_access_key"]),
            }
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigurationError(
                f"cannot read {path}; start `signd kms-server` first"
            ) from None
    policy_file = settings.get("key_policy_file")
    if policy_file is not None:
        try:
            options["key_policy"] = Path(str(policy_file)).read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {policy_file}: {exc.strerror}") from None
    return KmsKeyBackend(metadata, **options)
