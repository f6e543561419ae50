"""AWS KMS (or any endpoint speaking its protocol) through boto3.

Botocore errors are translated here, where they enter signd, so that callers only see the
:mod:`signd.errors` tree. Timeouts and the attempt budget are explicit so that an unreachable
KMS turns into ``DependencyUnavailable`` quickly instead of hanging a signing request.

**Recipient mode** (``recipient=Recipient(provider)``, inside an enclave): ``GenerateDataKey``
and ``Decrypt`` carry ``Recipient`` with the enclave's attestation document, and the data key is
read from ``CiphertextForRecipient``, opened with the enclave's RSA key. In that mode an answer
that carries a ``Plaintext`` is refused with :class:`~signd.errors.IntegrityError`, whatever
else it holds: AWS KMS never sends one to a ``Recipient``, so it is a forged answer or an
endpoint that ignored ``Recipient`` (moto does); either way the plaintext has crossed the host
in the clear and must not seal anything. IntegrityError (not AccessDenied) because nothing
refused the enclave anything: an answer failed a check it must pass to be trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

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
from signd.kms.recipient import Recipient

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

logger = logging.getLogger(__name__)

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
_PLAINTEXT_REFUSED: Final = "refused a KMS answer with a plaintext data key in recipient mode"


class _DropResponseBodies(logging.Filter):
    """Botocore logs every response body at DEBUG; a KMS body carries the plaintext data key."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Response body")


_BOTOCORE_PARSER_LOG: Final = logging.getLogger("botocore.parsers")
if not any(isinstance(f, _DropResponseBodies) for f in _BOTOCORE_PARSER_LOG.filters):
    _BOTOCORE_PARSER_LOG.addFilter(_DropResponseBodies())


def new_kms_client(
    *,
    region: str | None,
    endpoint_url: str | None,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> KMSClient:
    """A boto3 KMS client with bounded timeouts and retries (credentials default to boto3's)."""
    if max_attempts < 1:
        raise ConfigurationError("max_attempts must be at least 1", field="max_attempts")
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
    )
    try:
        return boto3.session.Session().client(
            "kms",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
    except (BotoCoreError, ValueError) as exc:
        raise ConfigurationError(f"cannot configure a KMS client: {type(exc).__name__}") from None


class AwsKms(KmsClient):
    """Data keys under one AWS KMS key (id, ARN or ``alias/...``).

    With ``recipient``, data keys are released only to that attested key (see the module doc).
    """

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
        recipient: Recipient | None = None,
    ) -> None:
        if not key_id:
            raise ConfigurationError("AWS KMS needs a key id", field="key_id")
        if max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1", field="max_attempts")
        self.key_id = key_id
        self.recipient = recipient
        self._client = (
            client
            if client is not None
            else new_kms_client(
                region=region,
                endpoint_url=endpoint_url,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
        )

    def __repr__(self) -> str:
        mode = ", recipient" if self.recipient is not None else ""
        endpoint = self._client.meta.endpoint_url
        return f"AwsKms(key_id={self.key_id!r}, endpoint={endpoint!r}{mode})"

    def _recipient_parameter(self) -> dict[str, Any]:
        return {} if self.recipient is None else {"Recipient": self.recipient.parameter()}

    def _data_key_of(
        self, response: Mapping[str, Any], operation: str, names: Sequence[str] = ("KeyId",)
    ) -> Secret:
        """The data key of a GenerateDataKey/Decrypt answer, as the mode demands it; an
        answer without one of ``names`` is KMS unavailable (:func:`answer_field`)."""
        if self.recipient is not None and response.get("Plaintext"):
            logger.warning(_PLAINTEXT_REFUSED)
            raise IntegrityError(_PLAINTEXT_REFUSED)
        for name in names:
            answer_field(response, name, operation)
        if self.recipient is None:
            plaintext = Secret(response.get("Plaintext") or b"")
        else:
            sealed = response.get("CiphertextForRecipient")
            if not sealed:
                raise IntegrityError(
                    f"KMS answered without CiphertextForRecipient (its fields: {_fields(response)})"
                )
            plaintext = self.recipient.open(sealed)
        if len(plaintext.reveal_bytes()) != DATA_KEY_SIZE:
            raise IntegrityError("KMS returned a data key of the wrong size")
        return plaintext

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        with _translated("GenerateDataKey", attested=self.recipient is not None):
            response = self._client.generate_data_key(
                KeyId=self.key_id,
                KeySpec="AES_256",
                EncryptionContext=dict(encryption_context or {}),
                **self._recipient_parameter(),
            )
        return DataKey(
            plaintext=self._data_key_of(response, "GenerateDataKey", ("KeyId", "CiphertextBlob")),
            ciphertext=response["CiphertextBlob"],
            kms_key_id=response["KeyId"],
        )

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        with _translated("Decrypt", attested=self.recipient is not None):
            response = self._client.decrypt(
                CiphertextBlob=ciphertext,
                KeyId=self.key_id,
                EncryptionContext=dict(encryption_context or {}),
                **self._recipient_parameter(),
            )
        return self._data_key_of(response, "Decrypt")

    def check_health(self) -> None:
        with _translated("DescribeKey"):
            metadata = self._client.describe_key(KeyId=self.key_id)["KeyMetadata"]
        if not metadata.get("Enabled", False):
            raise ConfigurationError(f"KMS key {self.key_id} is not enabled")

    def close(self) -> None:
        self._client.close()


def answer_field(response: Mapping[str, Any], name: str, operation: str) -> Any:
    """``response[name]``, which every answer to ``operation`` carries. An answer without it
    is no answer to the call (a garbled one, or another program's on a restarted server's
    port): KMS is unavailable for this call (503), as for a dropped connection."""
    value = response.get(name)
    if not value:
        missing = f"KMS answered {operation} without a {name} (its fields: {_fields(response)})"
        logger.warning(missing)
        raise DependencyUnavailable(missing)
    return value


def _fields(response: Mapping[str, Any]) -> str:
    """The names of an answer's fields (botocore keeps only modelled ones), for an error."""
    return ", ".join(sorted(name for name in response if name != "ResponseMetadata")) or "none"


@contextmanager
def _translated(operation: str, *, attested: bool = False) -> Iterator[None]:
    """Turn botocore errors raised by ``operation`` into signd errors.

    ``attested``: the request carried the enclave's attestation document (recipient mode), so
    an AccessDenied most likely means the key policy pins other PCRs; the message says how to
    re-pin after a deliberate upgrade.
    """
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
        if error_class is AccessDenied:
            raise AccessDenied(_access_denied_message(operation, code, attested=attested)) from exc
        raise error_class(f"KMS {operation} failed: {code}") from exc
    except _CONFIGURATION_ERRORS as exc:
        raise ConfigurationError(f"KMS {operation} is misconfigured: {type(exc).__name__}") from exc
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"KMS {operation} unavailable: {type(exc).__name__}") from exc


def _access_denied_message(operation: str, code: str, *, attested: bool) -> str:
    """What a key policy's refusal tells the operator (no key material, no request data)."""
    if not attested:
        return (
            f"KMS refused {operation} ({code}): its key policy does not release data keys to"
            f" this caller; an attestation-gated key refuses an enclave whose measurements"
            f" (PCRs) differ from the ones it pins"
        )
    return (
        f"KMS refused {operation} ({code}): its key policy does not release data keys to this"
        f" enclave; most likely the enclave's measurements (PCRs) differ from the ones the key"
        f" policy pins because the signd code changed. After a deliberate upgrade, run"
        f" `signd kms repin` (embedded kms-server) or put a key policy with the new PCRs"
        f" (AWS KMS)"
    )
