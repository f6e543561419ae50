"""What the SQL metadata stores share: schema migrations, row codecs, cursors and queries.

Records live in ``key_records`` with a ``seq`` column that grows with every insert; listings
are keyset-paginated on it, so a page never repeats or skips a record however many are added
meanwhile (PostgreSQL serialises inserts so that ``seq`` order is also commit order). Labels
are kept twice: in the record row (as given, in order) and one row per label in
``key_labels``, which is what the label filter searches.

**Group commit.** A commit is a durable write (an fsync for SQLite, a WAL flush for
PostgreSQL), and inserts are serialised anyway, so concurrent :meth:`SqlMetadataStore.add`
calls share one: while one transaction runs, the calls that arrive queue, and the next
transaction inserts all of them. A call that finds nothing running starts at once, so one
caller alone waits for nothing. Each call's records still succeed or fail together and only
its own: when a shared transaction is refused for a duplicate, every call in it is retried in
a transaction of its own, so only the call holding the duplicate sees KeyExists.

Keystore records (:class:`~signd.storage.base.KeystoreRecord`) are rows of ``store_settings``
named ``keystore:<location>`` with a JSON value: no schema change, so an older signd still
opens a database that holds them.

A cursor is ``base64(json).base64(mac)``: the last ``seq`` seen and the filters it was issued
for, authenticated with a random key stored in the database itself (so every node sharing the
database accepts it). Anything else, or a cursor reused with other filters, is InvalidField.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import secrets
import threading
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from signd.errors import ConfigurationError, InvalidField, KeyExists, SigndError
from signd.storage.base import (
    DETAIL_SCAN_PAGE,
    KeyRecord,
    KeystoreRecord,
    MetadataStore,
    RecordPage,
    check_detail_query,
    detail_matches,
    updated_keystore_record,
)

MAX_PAGE_SIZE = 1000

_RECORD_COLUMNS = "seq, key_id, chain, address, public_key, custody, created_at, labels, details"
_KEYSTORE_PREFIX = "keystore:"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: SQL statements applied together, in one transaction."""

    version: int
    name: str
    statements: tuple[str, ...]


class SqlCursor(Protocol):
    """The DB-API cursor subset the shared queries use (``?`` placeholders)."""

    def execute(self, sql: str, params: Sequence[Any], /) -> object: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Filters = tuple[str | None, str | None, str | None]


class CursorCodec:
    """Issues and checks the opaque, authenticated pagination cursors."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, after: int, filters: Filters) -> str:
        payload = json.dumps({"after": after, "filters": list(filters)}, separators=(",", ":"))
        body = payload.encode()
        return f"{_b64encode(body)}.{_b64encode(self._mac(body))}"

    def decode(self, cursor: str, filters: Filters) -> int:
        """The ``seq`` after which the next page starts."""
        invalid = InvalidField("cursor is not one this store issued", field="cursor")
        if not isinstance(cursor, str) or cursor.count(".") != 1:
            raise invalid
        body_text, mac_text = cursor.split(".")
        try:
            body, mac = _b64decode(body_text), _b64decode(mac_text)
        except (binascii.Error, ValueError):
            raise invalid from None
        canonical = _b64encode(body) == body_text and _b64encode(mac) == mac_text
        if not canonical or not hmac.compare_digest(mac, self._mac(body)):
            raise invalid
        payload = json.loads(body)
        if payload["filters"] != list(filters):
            raise InvalidField("cursor was issued for other filters", field="cursor")
        after: int = payload["after"]
        return after

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, b"signd-cursor-v1\0" + body, hashlib.sha256).digest()[:16]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_records(records: Sequence[KeyRecord]) -> list[KeyRecord]:
    """Reject records the database would store badly (raises InvalidField)."""
    checked = list(records)
    for record in checked:
        if not isinstance(record, KeyRecord):
            raise InvalidField("records must be KeyRecord instances", field="records")
        for field in ("key_id", "chain", "address", "custody"):
            value = getattr(record, field)
            if not isinstance(value, str) or not value:
                raise InvalidField(f"{field} must be a non-empty string", field=field)
        if not isinstance(record.public_key, bytes):
            raise InvalidField("public_key must be bytes", field="public_key")
        if not isinstance(record.created_at, datetime) or record.created_at.utcoffset() is None:
            raise InvalidField("created_at must be a timezone-aware datetime", field="created_at")
        if len(set(record.labels)) != len(record.labels) or not all(
            isinstance(label, str) and label for label in record.labels
        ):
            raise InvalidField("labels must be distinct non-empty strings", field="labels")
        if not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(part, str) for part in pair)
            for pair in record.details
        ):
            raise InvalidField("details must be (name, value) string pairs", field="details")
    return checked


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_PAGE_SIZE:
        raise InvalidField(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    return limit


@dataclass(eq=False)
class _Insert:
    """One :meth:`SqlMetadataStore.add` call's rows, waiting for the transaction that adds them."""

    rows: list[tuple[Any, ...]]
    labels: list[tuple[str, str]]
    done: bool = False
    """Its transaction has ended, one way or the other."""
    stored: bool = False
    error: SigndError | None = None


def _like_escaped(text: str) -> str:
    """``text`` as a literal in a ``LIKE`` pattern with ``ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _json(value: tuple[Any, ...], texts: dict[tuple[Any, ...], str]) -> str:
    """The JSON array of a record's labels or details, remembered in ``texts`` (the records of
    one call mostly share them)."""
    text = texts.get(value)
    if text is None:
        text = texts[value] = json.dumps(value)
    return text


class SqlMetadataStore(MetadataStore):
    """The metadata store logic, written once over a dialect's connections.

    A subclass names its ``migrations``, provides :meth:`_transaction` (which translates the
    driver's errors) and the dialect hooks, and calls :meth:`_open` once connected.
    """

    migrations: ClassVar[Sequence[Migration]]

    _cursors: CursorCodec
    _inserts: threading.Condition
    _queued: list[_Insert]
    _inserting: bool

    @abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[SqlCursor]:
        """A cursor inside a transaction that commits on success; driver errors translated."""

    def _sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders rewritten for the driver."""
        return text

    def _lock_schema(self, cursor: SqlCursor) -> None:
        """Hold off other nodes migrating the same database until this transaction ends."""

    def _lock_inserts(self, cursor: SqlCursor) -> None:
        """Hold off other inserts until this transaction ends (so seq order is commit order)."""

    def _dump_time(self, value: datetime) -> Any:
        return value.astimezone(UTC).isoformat()

    def _load_time(self, value: Any) -> datetime:
        return datetime.fromisoformat(value).astimezone(UTC)

    def _open(self) -> None:
        """Apply pending migrations and load the cursor key, in one locked transaction."""
        self._inserts = threading.Condition()
        self._queued = []
        self._inserting = False
        with self._transaction(write=True) as cursor:
            self._lock_schema(cursor)
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
                (),
            )
            cursor.execute("SELECT version FROM schema_migrations", ())
            applied = {row[0] for row in cursor.fetchall()}
            known = {migration.version for migration in self.migrations}
            if applied - known:
                raise ConfigurationError(
                    f"database schema version {max(applied)} is newer than this signd knows"
                )
            for migration in sorted(self.migrations, key=lambda m: m.version):
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    cursor.execute(statement, ())
                cursor.execute(
                    self._sql(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"
                    ),
                    (migration.version, migration.name, datetime.now(UTC).isoformat()),
                )
            cursor.execute(
                self._sql(
                    "INSERT INTO store_settings (name, value) VALUES ('cursor_key', ?) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
                (secrets.token_hex(32),),
            )
            cursor.execute("SELECT value FROM store_settings WHERE name = 'cursor_key'", ())
            self._cursors = CursorCodec(bytes.fromhex(cursor.fetchone()[0]))

    def schema_version(self) -> int:
        """The highest migration applied to the database."""
        with self._transaction(write=False) as cursor:
            cursor.execute("SELECT MAX(version) FROM schema_migrations", ())
            return int(cursor.fetchone()[0])

    def add(self, records: Sequence[KeyRecord]) -> None:
        """Insert ``records`` in one transaction, shared with concurrent calls (group commit)."""
        checked = check_records(records)
        if not checked:
            return
        times = {when: self._dump_time(when) for when in {r.created_at for r in checked}}
        texts: dict[tuple[Any, ...], str] = {}
        rows = [
            (
                r.key_id,
                r.chain,
                r.address,
                r.public_key,
                r.custody,
                times[r.created_at],
                _json(r.labels, texts),
                _json(r.details, texts),
            )
            for r in checked
        ]
        insert = _Insert(rows, [(label, r.key_id) for r in checked for label in r.labels])
        with self._inserts:
            self._queued.append(insert)
            while self._inserting and not insert.done:
                self._inserts.wait()
            leader = not insert.done
            if leader:
                group, self._queued = self._queued, []
                self._inserting = True
        if leader:
            try:
                self._insert_group(group)
            finally:
                with self._inserts:
                    self._inserting = False
                    for member in group:
                        member.done = True
                    self._inserts.notify_all()
        if insert.error is not None:
            raise insert.error
        if not insert.stored:
            raise SigndError("the metadata transaction shared with this insert failed")

    def _insert_group(self, group: list[_Insert]) -> None:
        """Insert every queued call's rows in one transaction; give each call its outcome."""
        try:
            self._insert(group)
        except SigndError as error:
            if len(group) == 1:
                group[0].error = error
            elif isinstance(error, KeyExists):
                for member in group:
                    try:
                        self._insert([member])
                    except SigndError as own:
                        member.error = own
            else:
                for member in group:
                    member.error = copy.copy(error)
                    member.error.__cause__ = error

    def _insert(self, group: list[_Insert]) -> None:
        with self._transaction(write=True) as cursor:
            self._lock_inserts(cursor)
            cursor.executemany(
                self._sql(
                    "INSERT INTO key_records (key_id, chain, address, public_key, custody, "
                    "created_at, labels, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                [row for member in group for row in member.rows],
            )
            labels = [label for member in group for label in member.labels]
            if labels:
                cursor.executemany(
                    self._sql(
                        "INSERT INTO key_labels (label, seq) "
                        "SELECT ?, seq FROM key_records WHERE key_id = ?"
                    ),
                    labels,
                )
        for member in group:
            member.stored = True

    def find(self, ref: str, *, custody: str | None = None) -> KeyRecord | None:
        if not isinstance(ref, str) or not ref:
            raise InvalidField("a key id or address is required", field="ref")
        sql = f"SELECT {_RECORD_COLUMNS} FROM key_records WHERE (key_id = ? OR address = ?)"  # noqa: S608 - constant SQL, values bound
        params: list[Any] = [ref, ref]
        if custody is not None:
            sql += " AND custody = ?"
            params.append(custody)
        sql += " ORDER BY CASE WHEN key_id = ? THEN 0 ELSE 1 END LIMIT 1"
        params.append(ref)
        with self._transaction(write=False) as cursor:
            cursor.execute(self._sql(sql), params)
            row = cursor.fetchone()
        return None if row is None else self._record(row)

    def list(
        self,
        *,
        custody: str | None = None,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> RecordPage:
        limit = check_limit(limit)
        filters: Filters = (custody, chain, label)
        after = 0 if cursor is None else self._cursors.decode(cursor, filters)
        sql = f"SELECT {_RECORD_COLUMNS} FROM key_records r WHERE r.seq > ?"  # noqa: S608 - constant SQL
        params: list[Any] = [after]
        if custody is not None:
            sql += " AND r.custody = ?"
            params.append(custody)
        if chain is not None:
            sql += " AND r.chain = ?"
            params.append(chain)
        if label is not None:
            sql += " AND EXISTS (SELECT 1 FROM key_labels l WHERE l.label = ? AND l.seq = r.seq)"
            params.append(label)
        sql += " ORDER BY r.seq LIMIT ?"
        params.append(limit + 1)
        with self._transaction(write=False) as db:
            db.execute(self._sql(sql), params)
            rows = db.fetchall()
        page = rows[:limit]
        next_cursor = self._cursors.encode(page[-1][0], filters) if len(rows) > limit else None
        return RecordPage([self._record(row) for row in page], next_cursor)

    def find_by_detail(
        self, name: str, value: str, *, prefix: bool = False, custody: str | None = None
    ) -> KeyRecord | None:
        """Scans in the database: only rows whose details hold ``value``'s JSON text (a
        ``LIKE``, so a superset) come back, a page at a time, and are then checked exactly."""
        check_detail_query(name, value)
        quoted = json.dumps(value)
        pattern = "%" + _like_escaped(quoted[:-1] if prefix else quoted) + "%"
        sql = (
            f"SELECT {_RECORD_COLUMNS} FROM key_records"  # noqa: S608 - constant SQL, values bound
            " WHERE seq > ? AND details LIKE ? ESCAPE '\\'"
        )
        params: list[Any] = [pattern]
        if custody is not None:
            sql += " AND custody = ?"
            params.append(custody)
        sql += " ORDER BY seq LIMIT ?"
        after = 0
        while True:
            with self._transaction(write=False) as cursor:
                cursor.execute(self._sql(sql), [after, *params, DETAIL_SCAN_PAGE])
                rows = cursor.fetchall()
            for row in rows:
                record = self._record(row)
                if detail_matches(record, name, value, prefix=prefix):
                    return record
            if len(rows) < DETAIL_SCAN_PAGE:
                return None
            after = rows[-1][0]

    def keystore_record(self, location: str) -> KeystoreRecord | None:
        with self._transaction(write=False) as cursor:
            return self._keystore_record(cursor, location)

    def record_keystore(self, seen: KeystoreRecord) -> KeystoreRecord:
        """Read first: a record that stands (the usual case, at every opening) costs no
        write. Otherwise re-read and write in one transaction that holds off other writers."""
        if not isinstance(seen, KeystoreRecord):
            raise InvalidField("a KeystoreRecord is required", field="record")
        current = self.keystore_record(seen.location)
        if current is not None and updated_keystore_record(current, seen) is None:
            return current
        with self._transaction(write=True) as cursor:
            self._lock_inserts(cursor)
            current = self._keystore_record(cursor, seen.location)
            updated = updated_keystore_record(current, seen)
            if updated is None:
                assert current is not None  # nothing stands in for a missing record
                return current
            value = json.dumps({"keystore_id": updated.keystore_id, "key_count": updated.key_count})
            cursor.execute(
                self._sql(
                    "INSERT INTO store_settings (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (_KEYSTORE_PREFIX + updated.location, value),
            )
        return updated

    def _keystore_record(self, cursor: SqlCursor, location: str) -> KeystoreRecord | None:
        if not isinstance(location, str) or not location:
            raise InvalidField("a keystore location is required", field="location")
        cursor.execute(
            self._sql("SELECT value FROM store_settings WHERE name = ?"),
            (_KEYSTORE_PREFIX + location,),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return KeystoreRecord(location, value["keystore_id"], value["key_count"])

    def _record(self, row: Sequence[Any]) -> KeyRecord:
        _, key_id, chain, address, public_key, custody, created_at, labels, details = row
        return KeyRecord(
            key_id=key_id,
            chain=chain,
            address=address,
            public_key=bytes(public_key),
            custody=custody,
            created_at=self._load_time(created_at),
            labels=tuple(json.loads(labels)),
            details=tuple((name, value) for name, value in json.loads(details)),
        )
