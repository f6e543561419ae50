"""The one exception root of signd, and the table that maps errors to wire codes.

Every error signd raises on purpose is a :class:`SigndError`. Foreign exceptions (from
coincurve, sqlite3, boto3, PKCS#11, ...) are translated where they enter, so callers only
ever catch this tree::

    SigndError
    ├── InvalidRequest                  4xx: the caller sent something wrong
    │   ├── InvalidField                a named input field is missing, malformed or out of range
    │   ├── InvalidTransaction          a transaction that cannot be encoded or decoded
    │   ├── InvalidTypedData            an EIP-712 document that cannot be encoded
    │   ├── InvalidSignature            a signature that does not parse or does not verify
    │   └── UnsupportedOperation        valid input the configured backend cannot serve
    ├── KeyNotFound                     404: no key with that id or address
    ├── KeyExists                       409: the key is already held
    ├── AccessDenied                    403: authentication or policy refused the request
    │   └── WrongPassphrase             the keystore passphrase does not open the keystore
    ├── IntegrityError                  a stored record failed its integrity check (tampered,
    │                                   swapped, corrupted); reveals nothing about why
    ├── CapacityExceeded                a backend is out of room for new keys
    ├── DependencyUnavailable           503: KMS, storage, database, HSM down or slow
    │   ├── DeadlineExceeded            a call to signd (signd.client) outlasted its timeout
    │   └── CustodyUnsupported          the custody's device cannot do what signd needs of it
    │                                   (an HSM without secp256k1)
    └── ConfigurationError              signd itself is configured wrongly
        └── ConfigurationRefused        clients or policy files refused; ``files`` names them
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Final

MAX_MESSAGE_LENGTH: Final = 1024
"""The most characters of an error's message (and 256 of its field) that an answer carries:
messages quote what the caller sent, which may be a megabyte long."""
MAX_FIELD_LENGTH: Final = 256


class SigndError(Exception):
    """Root of every error signd raises on purpose.

    ``code`` is a stable machine-readable name; ``http_status`` is what the API answers.
    Messages never contain secrets: key material, passphrases, PINs or data keys.
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        """The error as the JSON body the CLI and API return (message and field cut short
        past :data:`MAX_MESSAGE_LENGTH` and :data:`MAX_FIELD_LENGTH`, and always UTF-8
        encodable: a lone surrogate quoted from a request is written as its escape)."""
        body = {"code": self.code, "message": _cut(self.message, MAX_MESSAGE_LENGTH)}
        if self.field is not None:
            body["field"] = _cut(self.field, MAX_FIELD_LENGTH)
        return body


class InvalidRequest(SigndError):
    code = "invalid_request"
    http_status = 400


class InvalidField(InvalidRequest):
    code = "invalid_field"


class InvalidTransaction(InvalidRequest):
    code = "invalid_transaction"


class InvalidTypedData(InvalidRequest):
    code = "invalid_typed_data"


class InvalidSignature(InvalidRequest):
    code = "invalid_signature"


class UnsupportedOperation(InvalidRequest):
    code = "unsupported_operation"


class KeyNotFound(SigndError):
    code = "key_not_found"
    http_status = 404


class KeyExists(SigndError):
    code = "key_exists"
    http_status = 409


class AccessDenied(SigndError):
    code = "access_denied"
    http_status = 403


class WrongPassphrase(AccessDenied):
    code = "wrong_passphrase"


class IntegrityError(SigndError):
    code = "integrity_error"
    http_status = 500


class CapacityExceeded(SigndError):
    code = "capacity_exceeded"
    http_status = 507


class DependencyUnavailable(SigndError):
    code = "dependency_unavailable"
    http_status = 503


class DeadlineExceeded(DependencyUnavailable):
    """A call of :mod:`signd.client` took longer in all than its ``timeout`` (connecting,
    sending, and receiving the whole answer, however slowly it came)."""

    code = "deadline_exceeded"


class CustodyUnsupported(DependencyUnavailable):
    """The device behind a custody cannot do what signd needs of it, e.g. an HSM whose PKCS#11
    module or token does not make or use secp256k1 keys: no request of that custody can be
    served until the deployment changes, and no request is at fault."""

    code = "custody_unsupported"


class ConfigurationError(SigndError):
    code = "configuration_error"
    http_status = 500


class ConfigurationRefused(ConfigurationError):
    """Configuration files refused (nothing of them put in force): ``files`` names each one
    refused ("clients", "policy"), where the problem was found, so that who reports the
    refusal (publicly, without the message) need not read the names out of the message."""

    code = "configuration_refused"

    def __init__(
        self, message: str, *, files: Iterable[str] = (), field: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.files = tuple(files)

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"files": list(self.files)}


def _cut(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    try:
        text.encode()
    except UnicodeEncodeError:  # no UTF-8 form: no answer, frame or log line could carry it
        return text.encode(errors="backslashreplace").decode()
    return text


def shown(value: str, limit: int = 64) -> str:
    """A caller-given name (a key reference, a client id) as an error may quote it: quoted,
    printable, cut short, so that a 500 KB name does not come back as a 500 KB error."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")
