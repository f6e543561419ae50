"""The KMS client interface used for envelope encryption.

Two implementations: ``aws`` (boto3; any endpoint that speaks the AWS KMS protocol) and
``local`` (embedded, file-backed master key). The attestation ``Recipient`` flow is added by
the attestation work; callers already pass an encryption context so that ciphertexts are bound
to what they protect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from signd.crypto.secret import Secret

DATA_KEY_SIZE = 32


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh AES-256 data key: the plaintext (secret) and its KMS-wrapped form."""

    plaintext: Secret
    ciphertext: bytes
    kms_key_id: str


class KmsClient(ABC):
    """Generates and unwraps data keys under a master key held by the KMS."""

    kms_type: str

    @abstractmethod
    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        """A new 32-byte data key under the configured master key."""

    @abstractmethod
    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        """Unwrap a data key. A wrong context or foreign ciphertext raises IntegrityError."""

    def check_health(self) -> None:  # noqa: B027 - optional hook
        """Raise DependencyUnavailable when the KMS cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
