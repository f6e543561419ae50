"""AWS KMS (or any endpoint speaking its protocol) through boto3.

Botocore errors are translated here, where they enter signd, so that callers only see the
:mod:`signd.errors` tree. Timeouts and the attempt budget are explicit so that an unreachable
KMS turns into ``DependencyUnavailable`` quickly instead of hanging a signing request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from signd.crypto.secret import Secret
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    SigndError,
)
from signd.kms.base import DATA_KEY_SIZE, DataKey, KmsClient

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

_ERRORS_BY_CODE: Final[dict[str, type[SigndError]]] = {
    "InvalidCiphertextException": IntegrityError,
    "IncorrectKeyException": IntegrityError,
    "AccessDeniedException": AccessDenied,
    "NotFoundException": ConfigurationError,
    "DisabledException": ConfigurationError,
    "KMSInvalidStateException": ConfigurationError,
    "InvalidKeyUsageException": ConfigurationError,
    "UnrecognizedClientException": ConfigurationError,
    "ThrottlingException": DependencyUnavailable,
    "LimitExceededException": DependencyUnavailable,
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
_INTEGRITY_MESSAGE: Final = "data key ciphertext failed its integrity check"


class _DropResponseBodies(logging.Filter):
    """Botocore logs every response body at DEBUG; a KMS body carries the plaintext data key."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Response body")


_BOTOCORE_PARSER_LOG: Final = logging.getLogger("botocore.parsers")
if not any(isinstance(f, _DropResponseBodies) for f in _BOTOCORE_PARSER_LOG.filters):
    _BOTOCORE_PARSER_LOG.addFilter(_DropResponseBodies())


class AwsKms(KmsClient):
    """Data keys under one AWS KMS key (id, ARN or ``alias/...``)."""

    kms_type = "aws"

    def __init__(
        self,
        key_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: KMSClient | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
    ) -> None:
        if not key_id:
            raise ConfigurationError("AWS KMS needs a key id", field="key_id")
        if max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1", field="max_attempts")
        self.key_id = key_id
        if client is None:
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
            )
            try:
                client = boto3.session.Session().client(
                    "kms", region_name=region, endpoint_url=endpoint_url, config=config
                )
            except (BotoCoreError, ValueError) as exc:
                raise ConfigurationError(f"cannot configure the AWS KMS client: {exc}") from None
        self._client = client

    def __repr__(self) -> str:
        return f"AwsKms(key_id={self.key_id!r}, endpoint={self._client.meta.endpoint_url!r})"

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        with _translated("GenerateDataKey"):
            response = self._client.generate_data_key(
                KeyId=self.key_id,
                KeySpec="AES_256",
                EncryptionContext=dict(encryption_context or {}),
            )
        plaintext = Secret(response["Plaintext"])
        if len(plaintext.reveal_bytes()) != DATA_KEY_SIZE:
            raise IntegrityError("KMS returned a data key of the wrong size")
        return DataKey(
            plaintext=plaintext,
            ciphertext=response["CiphertextBlob"],
            kms_key_id=response["KeyId"],
        )

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        with _translated("Decrypt"):
            response = self._client.decrypt(
                CiphertextBlob=ciphertext,
                KeyId=self.key_id,
                EncryptionContext=dict(encryption_context or {}),
            )
        plaintext = Secret(response["Plaintext"])
        if len(plaintext.reveal_bytes()) != DATA_KEY_SIZE:
            raise IntegrityError(_INTEGRITY_MESSAGE)
        return plaintext

    def check_health(self) -> None:
        with _translated("DescribeKey"):
            metadata = self._client.describe_key(KeyId=self.key_id)["KeyMetadata"]
        if not metadata.get("Enabled", False):
            raise ConfigurationError(f"KMS key {self.key_id} is not enabled")

    def close(self) -> None:
        self._client.close()


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Turn botocore errors raised by ``operation`` into signd errors."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        fallback = DependencyUnavailable if status >= 500 else ConfigurationError
        error_class = _ERRORS_BY_CODE.get(code, fallback)
        if error_class is IntegrityError:
            raise IntegrityError(_INTEGRITY_MESSAGE) from None
        raise error_class(f"KMS {operation} failed: {code}") from exc
    except _CONFIGURATION_ERRORS as exc:
        raise ConfigurationError(f"KMS {operation} is misconfigured: {type(exc).__name__}") from exc
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"KMS {operation} unavailable: {type(exc).__name__}") from exc
