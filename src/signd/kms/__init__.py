"""Key management services: where data keys come from and get unwrapped.

``kms_from_config`` builds a client from a settings mapping whose ``type`` tag names the
backend: ``local`` (a file-backed master key, no server) or ``aws`` (boto3, imported only when
chosen; ``recipient = true`` puts the enclave's client in recipient mode). With no ``[kms]`` at
all, :func:`signd.operations.components.build_kms` starts the embedded ``signd kms-server``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from signd.errors import ConfigurationError
from signd.kms.base import DataKey, KmsClient
from signd.kms.local import LocalKms
from signd.kms.recipient import Recipient

__all__ = ["DataKey", "KmsClient", "LocalKms", "Recipient", "kms_from_config"]

T = TypeVar("T")


Factory = Callable[[Mapping[str, Any], Path, Recipient | None], KmsClient]


def _local(settings: Mapping[str, Any], home: Path, recipient: Recipient | None) -> KmsClient:
    return LocalKms(home, key_alias=_get(settings, "key_alias", str, "signd-default"))


KMS_CONNECT_TIMEOUT: Final = 2.0
KMS_READ_TIMEOUT: Final = 3.0
"""Default seconds per KMS read: with :data:`KMS_ATTEMPTS`, a stuck KMS fails the enclave's
call (and the blob read before it) within the host's wait for the enclave."""
KMS_ATTEMPTS: Final = 2


def _aws(settings: Mapping[str, Any], home: Path, recipient: Recipient | None) -> KmsClient:
    from signd.kms.aws import AwsKms

    key_id = _optional(settings, "key_id", str)
    if key_id is None:
        raise ConfigurationError("kms.key_id is required for the aws KMS", field="kms.key_id")
    use_recipient = _get(settings, "recipient", bool, False)
    return AwsKms(
        key_id,
        region=_optional(settings, "region", str),
        endpoint_url=_optional(settings, "endpoint_url", str),
        connect_timeout=_get(settings, "connect_timeout", float, KMS_CONNECT_TIMEOUT),
        read_timeout=_get(settings, "read_timeout", float, KMS_READ_TIMEOUT),
        max_attempts=_get(settings, "max_attempts", int, KMS_ATTEMPTS),
        recipient=recipient if use_recipient else None,
    )


_FACTORIES: Final[dict[str, tuple[Factory, set[str]]]] = {
    "local": (_local, {"type", "key_alias"}),
    "aws": (
        _aws,
        {
            "type",
            "key_id",
            "region",
            "endpoint_url",
            "connect_timeout",
            "read_timeout",
            "max_attempts",
            "recipient",
        },
    ),
}


def kms_from_config(
    settings: Mapping[str, Any], home: Path, *, recipient: Recipient | None = None
) -> KmsClient:
    """The KMS client that ``settings`` names by its ``type`` tag; unknown tags and keys fail.

    ``recipient`` is the enclave's attested key; an ``aws`` KMS with ``recipient = true`` uses
    it (callers outside the enclave pass None and get a client for health checks only).
    """
    kms_type = settings.get("type", "local")
    if kms_type not in _FACTORIES:
        known = ", ".join(sorted(_FACTORIES))
        raise ConfigurationError(
            f"unknown KMS type {kms_type!r} (known: {known})", field="kms.type"
        )
    factory, allowed = _FACTORIES[kms_type]
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ConfigurationError(
            f"unknown settings for the {kms_type} KMS: {', '.join(unknown)}", field="kms"
        )
    return factory(settings, home, recipient)


def _optional(settings: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    """``settings[name]`` checked to be a ``kind`` (an int is accepted as a float), or None."""
    value = settings.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigurationError(f"kms.{name} must be a {kind.__name__}", field=f"kms.{name}")
    return value


def _get(settings: Mapping[str, Any], name: str, kind: type[T], default: T) -> T:
    value = _optional(settings, name, kind)
    return default if value is None else value
