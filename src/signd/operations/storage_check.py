"""Reconcile enclave custody's two stores: the key records and the sealed blobs they name.

A created key is two writes: its sealed bytes go to the blob store (one batch blob per batch),
then its record, naming the blob and its byte range, to the metadata store. So two things can
go wrong, and only one of them is harmless:

- **a lost key**: a record whose blob is missing, or shorter than the range it names (or
  whose reference is malformed). The address was handed out and its key cannot sign. Nothing
  else finds this before someone tries to sign with it.
- **an orphan**: a blob no record names, left by a create whose metadata write failed (or a
  timed-out put that landed later). It is sealed ciphertext nothing can reach.

:func:`check_storage` walks every record of enclave custody (:func:`index_records`), then
lists the blobs (:func:`survey`): sizes and write times only, never a byte of a blob. Records
are walked first on purpose: a record is committed only after its blob is stored, so a blob
that a walked record names was already stored when the listing began, and a key reported
lost is really lost. A create that runs meanwhile can only add blobs the walk did not see a
record for: those look like orphans, and they are young.

:func:`quarantine_orphans` moves orphans to the blob store's quarantine
(:meth:`BlobStore.quarantine`), each only when, just before its move, it is older than
``older_than`` (at least :data:`MIN_ORPHAN_AGE`) by a fresh stat AND no record names it by a
fresh look-up in the metadata store. A create stores its blob and records it within seconds
(the host's waits for the enclave and the database are far shorter than
:data:`MIN_ORPHAN_AGE`) or never, so a blob that old that no record names will never be named.

Nothing here ever deletes a blob. An "orphan" is only an orphan of the metadata store the
check was given: pointed at the wrong database or a restored older one, the blobs of real,
handed-out keys look like old orphans. In the quarantine they are out of the way but whole,
and an operator can move them back by hand; purging the quarantine is left to an operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from signd.custody.base import utc_now
from signd.custody.enclave import BLOB_DETAIL, EnclaveBackend
from signd.enclave.references import BLOB_PREFIX, BlobRange
from signd.errors import IntegrityError, InvalidField, KeyExists, KeyNotFound, SigndError
from signd.storage.base import BlobStat, BlobStore, KeyRecord, MetadataStore
from signd.storage.blobs import check_blob_name

CUSTODY: Final = EnclaveBackend.custody_type
PAGE_SIZE: Final = 1000
MIN_ORPHAN_AGE: Final = 600.0
"""Seconds: no orphan younger than this is ever quarantined, whatever ``--older-than`` says."""
DEFAULT_ORPHAN_AGE: Final = 3600.0


@dataclass(frozen=True, slots=True)
class LostKey:
    """A record whose key cannot sign: its blob is missing or short, or its reference is bad."""

    key_id: str
    chain: str
    address: str
    blob: str
    """The reference on record (empty when there is none)."""
    problem: str
    """``missing``, ``short`` or ``malformed``."""
    blob_size: int | None = None
    """The size of the blob, when it is stored but short."""
    needed: int | None = None
    """The size the reference needs the blob to have at least."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "chain": self.chain,
            "address": self.address,
            "blob": self.blob,
            "problem": self.problem,
            "blob_size": self.blob_size,
            "needed": self.needed,
        }


@dataclass(frozen=True, slots=True)
class Orphan:
    """A blob no record named when the check ran."""

    name: str
    size: int
    modified: datetime
    age: float
    """Seconds since it was written, when the check ran."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "modified": self.modified.isoformat(),
            "age_seconds": round(self.age),
        }


@dataclass(frozen=True, slots=True)
class RecordIndex:
    """What the records need of the blob store: for each blob name, the least size it must
    have; and the records whose reference is unusable whatever the store holds."""

    records: int
    needs: dict[str, int]
    malformed: list[LostKey]


@dataclass(frozen=True, slots=True)
class QuarantineHolding:
    """What the blob store's quarantine holds: blobs an operator has yet to move back or
    purge by hand."""

    blobs: int
    size: int
    """Bytes, all blobs together."""

    def to_dict(self) -> dict[str, int]:
        return {"blobs": self.blobs, "bytes": self.size}


@dataclass(frozen=True, slots=True)
class StorageReport:
    records: int
    """Enclave custody records walked."""
    blobs: int
    """Blobs listed (names starting ``enclave-``)."""
    lost: list[LostKey]
    orphans: list[Orphan]
    """Oldest first."""
    checked_at: datetime
    in_quarantine: QuarantineHolding
    """What the quarantine held when the check ran (not counted as blobs or orphans)."""

    @property
    def consistent(self) -> bool:
        return not self.lost and not self.orphans


QUARANTINED: Final = "quarantined"
NAME_TAKEN: Final = "name taken in quarantine"


@dataclass(frozen=True, slots=True)
class OrphanOutcome:
    name: str
    action: str
    """``quarantined``; or why it stayed: ``too young``, ``named by a record``, ``gone``
    (moved or deleted meanwhile), ``name taken in quarantine`` (by a blob with other bytes),
    ``not tried`` (a store failed first, or the move was refused), ``failed``."""
    moved_to: str | None = None
    """Where a quarantined blob now is (a path or an ``s3://`` URL)."""

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "action": self.action, "moved_to": self.moved_to}


@dataclass(slots=True)
class QuarantineRun:
    """What :func:`quarantine_orphans` did; ``error`` is the store failure that stopped it,
    and ``refused`` why it moved nothing at all."""

    outcomes: list[OrphanOutcome] = field(default_factory=list)
    error: SigndError | None = None
    refused: str | None = None

    @property
    def quarantined(self) -> int:
        return sum(outcome.action == QUARANTINED for outcome in self.outcomes)


def enclave_records(metadata: MetadataStore) -> Iterator[KeyRecord]:
    """Every record of enclave custody, in creation order, a page at a time."""
    cursor: str | None = None
    while True:
        page = metadata.list(custody=CUSTODY, cursor=cursor, limit=PAGE_SIZE)
        yield from page.records
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _where(record: KeyRecord) -> tuple[str, BlobRange | None]:
    """The record's blob reference and the range it names (``None``: the whole blob).

    Raises IntegrityError for a missing or malformed reference, which the enclave refuses."""
    reference = dict(record.details).get(BLOB_DETAIL, "")
    where = BlobRange.parse(reference)
    if where is None:
        try:
            check_blob_name(reference)
        except InvalidField:
            raise IntegrityError("no usable blob reference on record") from None
    return reference, where


def _blob_need(where: BlobRange | None, reference: str) -> tuple[str, int]:
    """The blob name a reference reads and the least size that blob must have."""
    return (reference, 1) if where is None else (where.name, where.end)


def _lost(
    record: KeyRecord,
    blob: str,
    problem: str,
    *,
    blob_size: int | None = None,
    needed: int | None = None,
) -> LostKey:
    return LostKey(record.key_id, record.chain, record.address, blob, problem, blob_size, needed)


def index_records(metadata: MetadataStore) -> RecordIndex:
    """Walk every enclave record once: the blob names they read and the size each needs."""
    needs: dict[str, int] = {}
    malformed: list[LostKey] = []
    count = 0
    for record in enclave_records(metadata):
        count += 1
        try:
            reference, where = _where(record)
        except IntegrityError:
            blob = dict(record.details).get(BLOB_DETAIL, "")
            malformed.append(_lost(record, blob, "malformed"))
            continue
        name, least = _blob_need(where, reference)
        needs[name] = max(needs.get(name, 0), least)
    return RecordIndex(count, needs, malformed)


def survey(
    index: RecordIndex, metadata: MetadataStore, blobs: BlobStore, *, now: datetime | None = None
) -> StorageReport:
    """List the blobs against ``index``: the lost keys and the orphans.

    A blob a record names that the listing lacks is looked for once more with a stat. Each
    lost key is named by a second walk of the records, made only when some blob is missing
    or short (the first walk keeps only blob names and sizes, not records)."""
    checked_at = now or utc_now()
    sizes: dict[str, int] = {}
    orphans: list[Orphan] = []
    listed = 0
    for blob in blobs.list_blobs(BLOB_PREFIX):
        listed += 1
        if blob.name in index.needs:
            sizes[blob.name] = blob.size
        else:
            orphans.append(_orphan(blob, checked_at))
    for name in index.needs.keys() - sizes.keys():  # not listed (or not named enclave-*)
        found = blobs.stat(name)
        if found is not None:
            sizes[name] = found.size
    short = {name for name, least in index.needs.items() if sizes.get(name, -1) < least}
    lost = list(index.malformed)
    if short:
        lost.extend(_lost_keys(metadata, short, sizes))
    orphans.sort(key=lambda orphan: (orphan.modified, orphan.name))
    held = [blob.size for blob in blobs.list_quarantined()]
    return StorageReport(
        index.records, listed, lost, orphans, checked_at, QuarantineHolding(len(held), sum(held))
    )


def _orphan(blob: BlobStat, now: datetime) -> Orphan:
    return Orphan(blob.name, blob.size, blob.modified, (now - blob.modified).total_seconds())


def _lost_keys(
    metadata: MetadataStore, short: set[str], sizes: dict[str, int]
) -> Iterator[LostKey]:
    """The records whose range is not in the blob listed (or not listed) under its name."""
    for record in enclave_records(metadata):
        try:
            reference, where = _where(record)
        except IntegrityError:
            continue  # counted as malformed by the first walk
        name, least = _blob_need(where, reference)
        if name not in short:
            continue
        size = sizes.get(name)
        if size is None:
            yield _lost(record, reference, "missing", needed=least)
        elif size < least:
            yield _lost(record, reference, "short", blob_size=size, needed=least)


def check_storage(
    metadata: MetadataStore, blobs: BlobStore, *, now: datetime | None = None
) -> StorageReport:
    """Records first, then blobs (see the module docstring for why in this order)."""
    return survey(index_records(metadata), metadata, blobs, now=now)


def check_orphan_age(older_than: float) -> float:
    """``older_than`` if it is at least :data:`MIN_ORPHAN_AGE` seconds, else InvalidField."""
    if isinstance(older_than, bool) or not older_than >= MIN_ORPHAN_AGE:
        raise InvalidField(
            f"older_than must be at least {MIN_ORPHAN_AGE:g} seconds: a younger blob may"
            " belong to a create still under way",
            field="older_than",
        )
    return older_than


def quarantine_orphans(
    report: StorageReport,
    metadata: MetadataStore,
    blobs: BlobStore,
    *,
    older_than: float = DEFAULT_ORPHAN_AGE,
    now: Callable[[], datetime] = utc_now,
) -> QuarantineRun:
    """Move to the quarantine the report's orphans that are older than ``older_than``
    seconds and that no record names, both checked again just before each move. A store
    failure stops it: that orphan is ``failed``, those after it ``not tried``, and the error
    is returned.

    Nothing is moved when the report has lost keys or no record at all: then the metadata
    store is likely not the one these blobs belong with (another database, a restored
    backup), and its "orphans" may be the blobs of keys recorded elsewhere."""
    check_orphan_age(older_than)
    run = QuarantineRun(refused=_refusal(report))
    for orphan in report.orphans:
        if run.error is not None or run.refused is not None:
            outcome = OrphanOutcome(orphan.name, "not tried")
        elif orphan.age < older_than:
            outcome = OrphanOutcome(orphan.name, "too young")
        else:
            try:
                outcome = _quarantine_if_orphan(orphan.name, metadata, blobs, older_than, now)
            except SigndError as exc:
                run.error, outcome = exc, OrphanOutcome(orphan.name, "failed")
        run.outcomes.append(outcome)
    return run


def _refusal(report: StorageReport) -> str | None:
    if report.lost:
        return "keys are lost, so the two stores disagree: nothing is moved until they agree"
    if report.orphans and not report.records:
        return "no enclave key record at all: is this the metadata store these blobs belong to?"
    return None


def _quarantine_if_orphan(
    name: str,
    metadata: MetadataStore,
    blobs: BlobStore,
    older_than: float,
    now: Callable[[], datetime],
) -> OrphanOutcome:
    """Stat, then look for a record, then move: a create stores its blob before it records
    it, so a blob old enough at the stat that no record names after it is never named."""
    current = blobs.stat(name)
    if current is None:
        return OrphanOutcome(name, "gone")
    if (now() - current.modified).total_seconds() < older_than:
        return OrphanOutcome(name, "too young")
    if metadata.find_by_detail(BLOB_DETAIL, name, prefix=True) is not None:
        return OrphanOutcome(name, "named by a record")
    try:
        return OrphanOutcome(name, QUARANTINED, blobs.quarantine(name))
    except KeyNotFound:
        return OrphanOutcome(name, "gone")
    except KeyExists:
        return OrphanOutcome(name, NAME_TAKEN)
