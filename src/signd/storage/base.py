"""Storage interfaces. Neither store ever receives plaintext key material.

- :class:`BlobStore` holds sealed key blobs (filesystem default, S3 for several nodes), and
  lists them with their sizes and ages (:class:`BlobStat`) for ``signd storage check``, which
  moves orphan blobs to the store's quarantine: out of reach of every read and listing, but
  kept, for an operator to move back or purge by hand. No store ever deletes one on its own.
- :class:`MetadataStore` holds :class:`signd.custody.base.KeyInfo`-shaped records (SQLite
  default, PostgreSQL for several nodes); backend references such as a blob name, an HSM
  object id or a KMS key id travel in ``details``. It also keeps a :class:`KeystoreRecord`
  per keystore file, so that a keystore file that goes missing is not taken for a new one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from signd.errors import InvalidField, KeyNotFound


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key description (the same fields as ``KeyInfo``, no secret)."""

    key_id: str
    chain: str
    address: str
    public_key: bytes
    custody: str
    created_at: datetime
    labels: tuple[str, ...] = ()
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: list[KeyRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class KeystoreRecord:
    """What the metadata store knows of the keystore file at ``location`` (an absolute path):
    which keystore it is (``keystore_id``, from its header) and how many keys it has been
    seen holding. The count only grows: keys are never removed from a keystore."""

    location: str
    keystore_id: str
    key_count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.location, str) and self.location):
            raise InvalidField("a keystore location must be a non-empty string", field="location")
        if not (isinstance(self.keystore_id, str) and self.keystore_id):
            raise InvalidField("a keystore id must be a non-empty string", field="keystore_id")
        count = self.key_count
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidField("a key count must be a non-negative integer", field="key_count")


def updated_keystore_record(
    current: KeystoreRecord | None, seen: KeystoreRecord
) -> KeystoreRecord | None:
    """The record to store once ``seen`` has been seen at its location, or ``None`` when
    ``current`` stands: the same keystore keeps the larger count, and a record of another
    keystore is replaced only while it counts no key (one with keys is never dropped here:
    the caller finds the other keystore in the record that stands)."""
    if current is None:
        return seen
    if current.keystore_id == seen.keystore_id:
        return seen if seen.key_count > current.key_count else None
    return seen if current.key_count == 0 else None


@dataclass(frozen=True, slots=True)
class BlobStat:
    """What a listing or a HEAD / stat says of a stored blob, without reading its bytes."""

    name: str
    size: int
    modified: datetime
    """When it was written (file mtime, S3 ``LastModified``), timezone-aware."""


MAX_RANGE_LENGTH = 1 << 20


def check_range(offset: int, length: int) -> None:
    """A byte range must be non-negative and at most 1 MiB long."""
    if (
        isinstance(offset, bool)
        or isinstance(length, bool)
        or offset < 0
        or not 0 < length <= MAX_RANGE_LENGTH
    ):
        raise InvalidField("a blob range needs offset >= 0 and 0 < length <= 1 MiB", field="blob")


class BlobStore(ABC):
    """Names → bytes, written atomically and durably."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` durably under ``name``; an existing name raises KeyExists."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The bytes under ``name``; a missing name raises KeyNotFound."""

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob ``name`` from ``offset``; short or missing → KeyNotFound.

        Lets many sealed keys share one blob (one durable write per batch) while a signature
        still reads only its own key. Stores override it with a real ranged read.
        """
        check_range(offset, length)
        data = self.get(name)[offset : offset + length]
        if len(data) != length:
            raise KeyNotFound(f"blob {name!r} has no bytes {offset}..{offset + length}")
        return data

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name`` if present."""

    @abstractmethod
    def stat(self, name: str) -> BlobStat | None:
        """Size and write time of the blob ``name`` (no byte of it is read); ``None`` if it
        is not stored."""

    @abstractmethod
    def list_blobs(self, prefix: str = "") -> Iterator[BlobStat]:
        """Every blob whose name starts with ``prefix``, in no particular order, read a page
        at a time (no byte of any blob is read). A blob written or deleted while the listing
        runs may or may not be in it."""

    @abstractmethod
    def quarantine(self, name: str) -> str:
        """Move the blob ``name`` to the store's quarantine and return where it now is (a path
        or an ``s3://`` URL). There no get, stat or listing finds it, but its bytes are kept
        as they were, for an operator to move back or purge by hand. A missing blob raises
        KeyNotFound; a quarantined blob of that name with other bytes raises KeyExists (it
        is never replaced). A move that stopped half way is finished by the next call."""

    @abstractmethod
    def list_quarantined(self) -> Iterator[BlobStat]:
        """Every blob in the quarantine, in no particular order (no byte of any is read)."""

    def check_health(self) -> None:  # noqa: B027 - optional hook
        """Raise DependencyUnavailable when the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


DETAIL_SCAN_PAGE = 1000
"""Records read per query by :meth:`MetadataStore.find_by_detail`."""


def check_detail_query(name: str, value: str) -> None:
    """A detail query needs a non-empty detail name and value."""
    for field, text in (("name", name), ("value", value)):
        if not isinstance(text, str) or not text:
            raise InvalidField(f"a detail {field} must be a non-empty string", field=field)


def detail_matches(record: KeyRecord, name: str, value: str, *, prefix: bool) -> bool:
    """Whether ``record``'s detail ``name`` is ``value`` (with ``prefix``: starts with it)."""
    return any(
        key == name and (found.startswith(value) if prefix else found == value)
        for key, found in record.details
    )


class MetadataStore(ABC):
    """Key descriptions, looked up by key id or address, listed in creation order."""

    @abstractmethod
    def add(self, records: Sequence[KeyRecord]) -> None:
        """Insert all records in one transaction; a duplicate key id or address → KeyExists."""

    @abstractmethod
    def find(self, ref: str, *, custody: str | None = None) -> KeyRecord | None:
        """The record whose key id or address equals ``ref``."""

    @abstractmethod
    def list(
        self,
        *,
        custody: str | None = None,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> RecordPage:
        """Records in creation order, filtered; ``cursor`` is opaque."""

    def find_by_detail(
        self, name: str, value: str, *, prefix: bool = False, custody: str | None = None
    ) -> KeyRecord | None:
        """The first record, in creation order, whose detail ``name`` is ``value`` (with
        ``prefix``: starts with it). It reads the whole store: for maintenance, such as
        re-checking that no record names a blob before deleting it, not for requests."""
        check_detail_query(name, value)
        cursor: str | None = None
        while True:
            page = self.list(custody=custody, cursor=cursor, limit=DETAIL_SCAN_PAGE)
            for record in page.records:
                if detail_matches(record, name, value, prefix=prefix):
                    return record
            if page.next_cursor is None:
                return None
            cursor = page.next_cursor

    @abstractmethod
    def keystore_record(self, location: str) -> KeystoreRecord | None:
        """What is recorded of the keystore file at ``location``, if anything."""

    @abstractmethod
    def record_keystore(self, seen: KeystoreRecord) -> KeystoreRecord:
        """Record ``seen`` as :func:`updated_keystore_record` says, atomically against other
        writers, and return the record that now stands."""

    def check_health(self) -> None:  # noqa: B027 - optional hook
        """Raise DependencyUnavailable when the database cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
