"""Backends whose key descriptions live in a :class:`MetadataStore` (enclave, HSM, KMS).

The store holds :class:`KeyRecord` rows; this module is the one place that turns them into
:class:`KeyInfo` and back, and gives such backends their lookups.
"""

from __future__ import annotations

from typing import Self

from signd.custody.base import CustodyBackend, KeyInfo, KeyPage
from signd.storage.base import KeyRecord, MetadataStore


def record_from_info(info: KeyInfo) -> KeyRecord:
    """The stored form of a key description."""
    return KeyRecord(
        key_id=info.key_id,
        chain=info.chain,
        address=info.address,
        public_key=info.public_key,
        custody=info.custody,
        created_at=info.created_at,
        labels=info.labels,
        details=tuple(sorted(info.details.items())),
    )


def info_from_record(record: KeyRecord) -> KeyInfo:
    """A key description from its stored form."""
    return KeyInfo(
        key_id=record.key_id,
        chain=record.chain,
        address=record.address,
        public_key=record.public_key,
        custody=record.custody,
        created_at=record.created_at,
        labels=record.labels,
        details=dict(record.details),
    )


class MetadataBackedBackend(CustodyBackend):
    """Finds and lists its keys in a metadata store, restricted to its own custody type."""

    def __init__(self, metadata: MetadataStore) -> None:
        self._metadata = metadata
        self._owns_metadata = False

    def own_metadata(self) -> Self:
        """Close the metadata store with this backend (it was opened for this backend alone)."""
        self._owns_metadata = True
        return self

    def close(self) -> None:
        if self._owns_metadata:
            self._metadata.close()

    def check_health(self) -> None:
        """Raise :class:`~signd.errors.DependencyUnavailable` when the metadata store does not
        answer: without it no key can be found, so none can sign. Subclasses check their own
        dependencies, then call this."""
        self._metadata.check_health()

    def find_key(self, ref: str) -> KeyInfo | None:
        record = self._metadata.find(ref, custody=self.custody_type)
        return None if record is None else info_from_record(record)

    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        page = self._metadata.list(
            custody=self.custody_type, chain=chain, label=label, cursor=cursor, limit=limit
        )
        return KeyPage([info_from_record(record) for record in page.records], page.next_cursor)
