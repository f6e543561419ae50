"""Registries that build the configured KMS client, blob store and metadata store.

Each config table names its implementation with a ``type`` tag; one dict per component maps
tags to factories, and an unknown tag or key is a :class:`ConfigurationError` at start-up.
Paths may use ``{home}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from signd.config import Settings, config_number, expand_home
from signd.errors import ConfigurationError
from signd.kms import KmsClient, Recipient, kms_from_config
from signd.storage.base import BlobStore, MetadataStore

T = TypeVar("T")
logger = logging.getLogger(__name__)


def _check_keys(section: str, settings: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(settings) - allowed - {"type"})
    if unknown:
        raise ConfigurationError(
            f"unknown settings in [{section}]: {', '.join(unknown)}", field=section
        )


def _text(section: str, settings: Mapping[str, Any], key: str, default: str | None) -> str:
    value = settings.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{section}.{key} must be a non-empty string", field=section)
    return value


def _count(section: str, settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{section}.{key} must be a positive integer", field=section)
    return value


def _filesystem_blobs(settings: Mapping[str, Any], home: Path) -> BlobStore:
    from signd.storage.blobs import FilesystemBlobStore

    _check_keys("blobs", settings, {"path"})
    return FilesystemBlobStore(
        Path(expand_home(_text("blobs", settings, "path", "{home}/blobs"), home))
    )


BLOB_TIMEOUT: Final = 3.0
"""Default seconds per S3 connect and read: with :data:`BLOB_ATTEMPTS`, a stuck bucket fails a
blob read inside the enclave well within the host's wait for the enclave (see
:data:`signd.operations.backends.ENCLAVE_TIMEOUT`)."""
BLOB_ATTEMPTS: Final = 2


def _s3_blobs(settings: Mapping[str, Any], home: Path) -> BlobStore:
    from signd.storage.s3 import S3BlobStore

    _check_keys(
        "blobs", settings, {"bucket", "prefix", "endpoint_url", "region", "timeout", "max_attempts"}
    )
    return S3BlobStore(
        _text("blobs", settings, "bucket", None),
        str(settings.get("prefix", "signd/")),
        endpoint_url=settings.get("endpoint_url"),
        region=settings.get("region"),
        timeout=config_number("blobs", settings, "timeout", BLOB_TIMEOUT),
        max_attempts=_count("blobs", settings, "max_attempts", BLOB_ATTEMPTS),
    )


def _sqlite_metadata(settings: Mapping[str, Any], home: Path) -> MetadataStore:
    from signd.storage.sqlite import SqliteMetadataStore

    _check_keys("metadata", settings, {"path"})
    path = expand_home(_text("metadata", settings, "path", "{home}/metadata.db"), home)
    return SqliteMetadataStore(Path(path))


def _postgres_metadata(settings: Mapping[str, Any], home: Path) -> MetadataStore:
    from signd.storage.postgres import PostgresMetadataStore

    _check_keys("metadata", settings, {"dsn", "pool_size", "timeout"})
    timeout = config_number("metadata", settings, "timeout", 5.0)
    return PostgresMetadataStore(
        _text("metadata", settings, "dsn", None),
        pool_size=int(config_number("metadata", settings, "pool_size", 4)),
        connect_timeout=timeout,
        statement_timeout=timeout,
        pool_timeout=timeout,
    )


BLOB_STORES: dict[str, Callable[[Mapping[str, Any], Path], BlobStore]] = {
    "filesystem": _filesystem_blobs,
    "s3": _s3_blobs,
}
METADATA_STORES: dict[str, Callable[[Mapping[str, Any], Path], MetadataStore]] = {
    "sqlite": _sqlite_metadata,
    "postgres": _postgres_metadata,
}


def _pick(
    registry: Mapping[str, Any], section: str, settings: Mapping[str, Any], default: str
) -> Any:
    tag = settings.get("type", default)
    if tag not in registry:
        raise ConfigurationError(
            f"unknown {section}.type {tag!r} (known: {', '.join(sorted(registry))})",
            field=f"{section}.type",
        )
    return registry[tag]


EMBEDDED_KMS_TYPE = "kms-server"
LEGACY_LOCAL_KEY = Path("kms") / "signd-default.key"


def build_kms(settings: Settings, *, recipient: Recipient | None = None) -> KmsClient:
    """The configured KMS; ``recipient`` is the enclave's attested key (None elsewhere).

    With no ``[kms]`` (or ``type = "kms-server"``) it is the embedded kms-server
    (:mod:`signd.operations.local_kms`), in recipient mode when ``recipient`` is given. A home
    that already holds the master key of the earlier embedded default (``LocalKms``,
    ``kms/signd-default.key``) and has no ``[kms]`` keeps using it, so its keys stay usable.
    """
    section = settings.section("kms")
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if section.get("type", "local" if section else EMBEDDED_KMS_TYPE) != EMBEDDED_KMS_TYPE:
        return kms_from_config(section, settings.home, recipient=recipient)
    _check_keys("kms", section, set())
    if not section and (settings.home / LEGACY_LOCAL_KEY).exists():
        logger.warning(
            "using the local KMS master key %s (no [kms] configured); its data keys are not"
            " attestation-gated",
            settings.home / LEGACY_LOCAL_KEY,
        )
        return kms_from_config({"type": "local"}, settings.home)
    from signd.operations.local_kms import EmbeddedKms

    return EmbeddedKms(settings.home, recipient=recipient)


def build_blob_store(settings: Settings) -> BlobStore:
    section = settings.section("blobs")
    factory: Callable[[Mapping[str, Any], Path], BlobStore]
    factory = _pick(BLOB_STORES, "blobs", section, "filesystem")
    return factory(section, settings.home)


def build_metadata_store(settings: Settings) -> MetadataStore:
    section = settings.section("metadata")
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    factory: Callable[[Mapping[str, Any], Path], MetadataStore]
    factory = _pick(METADATA_STORES, "metadata", section, "sqlite")
    return factory(section, settings.home)
