"""AWS-shaped errors: what the server answers when a request cannot be served.

Every failure a client can cause becomes a :class:`KmsApiError`, which the HTTP layer turns
into the body AWS KMS sends (``{"__type": "...Exception", "message": ...}``) with its status.
Messages never carry key material, data keys or credentials.
"""

from __future__ import annotations

from typing import Final

BAD_REQUEST: Final = 400


class KmsApiError(Exception):
    """An error answered to the client as ``{"__type": error_type, "message": message}``."""

    def __init__(self, error_type: str, message: str, *, status: int = BAD_REQUEST) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status

    def to_body(self) -> dict[str, str]:
        return {"__type": self.error_type, "message": self.message}


def validation(message: str) -> KmsApiError:
    return KmsApiError("ValidationException", message)


def serialization(message: str) -> KmsApiError:
    return KmsApiError("SerializationException", message)


def not_found(message: str) -> KmsApiError:
    return KmsApiError("NotFoundException", message)


def access_denied(message: str) -> KmsApiError:
    return KmsApiError("AccessDeniedException", message)


def invalid_ciphertext() -> KmsApiError:
    return KmsApiError("InvalidCiphertextException", "the ciphertext is invalid")


def invalid_key_usage(message: str) -> KmsApiError:
    return KmsApiError("InvalidKeyUsageException", message)
