"""The SQLite metadata store: one node's default.

Each thread gets its own connection (WAL lets readers run beside the one writer); writes take
the database lock up front (``BEGIN IMMEDIATE``) and wait for it up to ``busy_timeout``
seconds, after which the call raises DependencyUnavailable. ``synchronous=FULL``: a record
reported stored survives a power cut, since losing it would orphan a handed-out address. That
costs an fsync of the WAL per commit, which concurrent inserts share (group commit, see
:mod:`signd.storage.metadata`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from signd.errors import DependencyUnavailable, KeyExists
from signd.storage.metadata import Migration, SqlCursor, SqlMetadataStore

MIGRATIONS = (
    Migration(
        1,
        "key records, labels and settings",
        (
            "CREATE TABLE key_records ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " key_id TEXT NOT NULL CONSTRAINT key_records_key_id_key UNIQUE,"
            " chain TEXT NOT NULL,"
            " address TEXT NOT NULL CONSTRAINT key_records_address_key UNIQUE,"
            " public_key BLOB NOT NULL,"
            " custody TEXT NOT NULL,"
            " created_at TEXT NOT NULL,"
            " labels TEXT NOT NULL,"
            " details TEXT NOT NULL)",
            "CREATE INDEX key_records_custody ON key_records (custody, seq)",
            "CREATE INDEX key_records_chain ON key_records (chain, seq)",
            "CREATE TABLE key_labels ("
            " label TEXT NOT NULL,"
            " seq INTEGER NOT NULL REFERENCES key_records (seq) ON DELETE CASCADE,"
            " PRIMARY KEY (label, seq)) WITHOUT ROWID",
            "CREATE TABLE store_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
)


def probe_write(connection: sqlite3.Connection) -> None:
    """Inside the caller's write transaction, write without changing anything: setting
    ``user_version`` to its own value dirties the header page, so the commit writes (and,
    with ``synchronous=FULL``, syncs) a WAL frame. A write rolled back, or an UPDATE to the
    same value, never reaches the disk, so it cannot tell whether the disk takes writes."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.execute(f"PRAGMA user_version = {int(version)}")


class SqliteMetadataStore(SqlMetadataStore):
    """Key records in one SQLite file; safe to share between threads."""

    migrations = MIGRATIONS

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._write_failure: str | None = None
        """Why the last write failed, until a write succeeds (see :meth:`check_health`)."""
        self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def check_health(self) -> None:
        """The database answers, and takes writes: after a write failed, each check commits
        a change-nothing write (:func:`probe_write`) until one succeeds."""
        with self._transaction(write=False) as cursor:
            cursor.execute("SELECT 1", ())
        failure = self._write_failure
        if failure is not None:
            try:
                with self._transaction(write=True):
                    probe_write(self._connection())
            except DependencyUnavailable:
                raise DependencyUnavailable(
                    f"SQLite {self.path} takes no writes: {failure}"
                ) from None

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        with self._lock:
            if self._closed:
                raise DependencyUnavailable("metadata store is closed")
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        connection = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._enable_wal(connection)
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            connection.close()
            raise
        with self._lock:
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    def _enable_wal(self, connection: sqlite3.Connection) -> None:
        """Switch to WAL (persistent), retrying: SQLite does not wait for this lock itself."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[SqlCursor]:
        try:
            connection = self._connection()
            cursor = connection.cursor()
            try:
                if write:
                    cursor.execute("BEGIN IMMEDIATE")
                yield cursor
                if write:
                    cursor.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
            finally:
                cursor.close()
        except sqlite3.IntegrityError as exc:
            message = str(exc)
            if "UNIQUE" not in message:
                raise DependencyUnavailable(f"SQLite {self.path}: constraint failed") from exc
            what = "address" if "address" in message else "key id"
            raise KeyExists(f"a key with this {what} is already stored") from exc
        except sqlite3.Error as exc:
            reason = getattr(exc, "sqlite_errorname", type(exc).__name__)
            error = DependencyUnavailable(f"SQLite {self.path} unavailable: {reason}")
            if write:
                self._write_failure = error.message
            raise error from exc
        if write:
            self._write_failure = None
