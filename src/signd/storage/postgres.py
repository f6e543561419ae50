"""The PostgreSQL metadata store (psycopg 3), shared by several signd nodes.

Connections come from a small pool. Each is bounded three ways: ``connect_timeout`` when
opening, a server-side ``statement_timeout``/``lock_timeout``, and a client-side deadline on
every round trip (``statement_timeout`` plus a grace second), which also catches a server
that accepted the connection and then stopped answering. A connection that failed, timed out
or was closed by the server while idle is dropped, and the next call opens a fresh one: the
store recovers by itself once the database is back.

Nodes that open the same database at once take turns migrating it (an advisory lock), and
inserts are serialised by another advisory lock so that ``seq`` order is commit order and a
listing never skips a record committed late.
"""

from __future__ import annotations

import math
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from signd.errors import DependencyUnavailable, KeyExists
from signd.storage.metadata import Migration, SqlCursor, SqlMetadataStore

MIGRATIONS = (
    Migration(
        1,
        "key records, labels and settings",
        (
            "CREATE TABLE key_records ("
            " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " key_id TEXT NOT NULL CONSTRAINT key_records_key_id_key UNIQUE,"
            " chain TEXT NOT NULL,"
            " address TEXT NOT NULL CONSTRAINT key_records_address_key UNIQUE,"
            " public_key BYTEA NOT NULL,"
            " custody TEXT NOT NULL,"
            " created_at TIMESTAMPTZ NOT NULL,"
            " labels TEXT NOT NULL,"
            " details TEXT NOT NULL)",
            "CREATE INDEX key_records_custody ON key_records (custody, seq)",
            "CREATE INDEX key_records_chain ON key_records (chain, seq)",
            "CREATE TABLE key_labels ("
            " label TEXT NOT NULL,"
            " seq BIGINT NOT NULL REFERENCES key_records (seq) ON DELETE CASCADE,"
            " PRIMARY KEY (label, seq))",
            "CREATE TABLE store_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
)

_SCHEMA_LOCK = 0x5349474E44_01
_INSERT_LOCK = 0x5349474E44_02


HEALTH_WITHIN: Final = 2.0
"""Seconds a whole health check may take: waiting for a connection (opening one when none is
idle) and its round trip together."""


class _DeadlineConnection(psycopg.Connection[tuple[Any, ...]]):
    """A connection whose every wait on the server gives up after ``io_timeout`` seconds."""

    io_timeout: float = 10.0

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        return super().wait(gen, interval, self.io_timeout if timeout is None else timeout)


class _Pool:
    """At most ``size`` connections; idle ones are checked before reuse."""

    def __init__(
        self,
        connect: Callable[[], _DeadlineConnection],
        size: int,
        wait_timeout: float,
        where: str,
    ) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._wait_timeout = wait_timeout
        self._where = where
        self._idle: list[_DeadlineConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._connector = ThreadPoolExecutor(size, thread_name_prefix="signd-pg-connect")
        """Opens the connections that a call bounded by ``within`` waits for."""

    @contextmanager
    def connection(self, within: float | None = None) -> Iterator[_DeadlineConnection]:
        """A connection, waited for at most the pool's wait timeout. With ``within``, the
        whole call is bounded by it: the wait for a slot, opening a connection when none is
        idle, and each round trip on the connection meanwhile."""
        deadline = None if within is None else time.monotonic() + within
        wait = self._wait_timeout if within is None else min(within, self._wait_timeout)
        if not self._slots.acquire(timeout=wait):
            raise DependencyUnavailable("every PostgreSQL connection of this node is busy")
        slot_held = True
        try:
            connection = self._take()
            if connection is None:
                if deadline is None:
                    connection = self._connect()
                else:
                    slot_held = False  # until the connection is had, its opening holds it
                    connection = self._connect_before(deadline)
                    slot_held = True
            usual = connection.io_timeout
            if deadline is not None:
                connection.io_timeout = max(0.0, min(deadline - time.monotonic(), usual))
            try:
                yield connection
            finally:
                connection.io_timeout = usual
                self._give_back(connection)
        finally:
            if slot_held:
                self._slots.release()

    def _connect_before(self, deadline: float) -> _DeadlineConnection:
        """A new connection, opened in the background and waited for until ``deadline``.

        One that comes later (a server that hangs: the connect timeout still bounds it) is
        not waited for: it keeps the caller's slot until it is had, then joins the idle
        connections, so that it serves the next call once the server answers again."""
        try:
            opening = self._connector.submit(self._connect)
        except RuntimeError:  # closed meanwhile
            self._slots.release()
            raise DependencyUnavailable("metadata store is closed") from None
        try:
            return opening.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            opening.add_done_callback(self._adopt)
            raise DependencyUnavailable(f"{self._where} unavailable: no answer in time") from None
        except BaseException:
            self._slots.release()
            raise

    def _adopt(self, opening: Future[_DeadlineConnection]) -> None:
        """A connection opened after its caller stopped waiting: idle, and its slot freed."""
        try:
            if opening.exception() is None:
                self._give_back(opening.result())
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        self._connector.shutdown(wait=False)
        for connection in idle:
            connection.close()

    def _take(self) -> _DeadlineConnection | None:
        while True:
            with self._lock:
                if self._closed:
                    raise DependencyUnavailable("metadata store is closed")
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if _usable(connection):
                return connection
            connection.close()

    def _give_back(self, connection: _DeadlineConnection) -> None:
        healthy = (
            not connection.closed and connection.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            if healthy and not self._closed:
                self._idle.append(connection)
                return
        connection.close()


def _usable(connection: _DeadlineConnection) -> bool:
    """False if the server closed an idle connection (its socket turned readable)."""
    if connection.closed or connection.broken:
        return False
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    return not poller.poll(0)


class PostgresMetadataStore(SqlMetadataStore):
    """Key records in a PostgreSQL database that several nodes may share."""

    migrations = MIGRATIONS

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
        pool_timeout: float = 5.0,
    ) -> None:
        """``dsn`` is a libpq connection string or URL; the timeouts join its ``options``."""
        self._dsn = dsn
        params = conninfo_to_dict(dsn)
        self._options = str(params.get("options") or "")
        self._where = (
            f"PostgreSQL at {params.get('host', 'localhost')}:{params.get('port', 5432)}"
            f"/{params.get('dbname', '')}"
        )
        self._connect_timeout = max(2, math.ceil(connect_timeout))
        self._statement_ms = max(1, round(statement_timeout * 1000))
        self._io_timeout = statement_timeout + 1.0
        self._pool = _Pool(self._new_connection, pool_size, pool_timeout, self._where)
        self._open()

    def close(self) -> None:
        self._pool.close()

    def check_health(self) -> None:
        """``SELECT 1``, answered within :data:`HEALTH_WITHIN` seconds: a server that hangs is
        named here, before a readiness check's own wait (5 s) ends."""
        with self._transaction(write=False, within=HEALTH_WITHIN) as cursor:
            cursor.execute("SELECT 1", ())

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _lock_schema(self, cursor: SqlCursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))

    def _lock_inserts(self, cursor: SqlCursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_INSERT_LOCK,))

    def _dump_time(self, value: datetime) -> Any:
        return value

    def _load_time(self, value: Any) -> datetime:
        stored: datetime = value
        return stored.astimezone(UTC)

    def _new_connection(self) -> _DeadlineConnection:
        options = (
            f"{self._options} -c statement_timeout={self._statement_ms}"
            f" -c lock_timeout={self._statement_ms}"
            " -c idle_in_transaction_session_timeout=60000 -c TimeZone=UTC"
        )
        connection = _DeadlineConnection.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=self._connect_timeout,
            options=options,
            application_name="signd",
        )
        connection.io_timeout = self._io_timeout
        return connection

    @contextmanager
    def _transaction(self, *, write: bool, within: float | None = None) -> Iterator[SqlCursor]:
        try:
            with self._pool.connection(within) as connection, connection.cursor() as cursor:
                if write:
                    with connection.transaction():
                        yield cursor
                else:
                    yield cursor
        except pg_errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name or ""
            what = "address" if "address" in constraint else "key id"
            raise KeyExists(f"a key with this {what} is already stored") from exc
        except psycopg.Error as exc:
            timed_out = (
                isinstance(exc, pg_errors.QueryCanceled | pg_errors.LockNotAvailable)
                or "Timeout" in type(exc).__name__
            )
            reason = "no answer in time" if timed_out else exc.sqlstate or type(exc).__name__
            raise DependencyUnavailable(f"{self._where} unavailable: {reason}") from exc
