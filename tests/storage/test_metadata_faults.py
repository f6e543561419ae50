"""A database that is down, stuck, locked or broken: DependencyUnavailable fast, then recovery."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from signd.errors import DependencyUnavailable, SigndError
from signd.storage.postgres import HEALTH_WITHIN, PostgresMetadataStore
from signd.storage.sqlite import SqliteMetadataStore
from tests.fixtures.files import immutable
from tests.fixtures.servers import PostgresServer
from tests.storage.test_metadata_contract import record


@contextmanager
def fails_within(seconds: float) -> Iterator[list[SigndError]]:
    """Expect DependencyUnavailable, raised within ``seconds``."""
    caught: list[SigndError] = []
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        yield caught
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    caught.append(info.value)


# ----------------------------------------------------------------------------- SQLite


def test_sqlite_write_lock_held_elsewhere(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.sqlite", busy_timeout=0.3)
    kept = record()
    store.add([kept])
    blocker = sqlite3.connect(tmp_path / "m.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with fails_within(2) as caught:
            store.add([record()])
        assert "SQLITE_BUSY" in caught[0].message
        assert store.find(kept.key_id) == kept
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    later = record()
    store.add([later])
    assert store.list().records == [kept, later]
    store.close()


def test_sqlite_disk_refusing_writes_is_unhealthy_until_it_takes_them(tmp_path: Path) -> None:
    """A commit the disk refuses (``chattr +i`` on the database and its WAL) is a 503, and
    check_health says so (a read alone would not notice) until writes work again, without
    waiting for another insert."""
    path = tmp_path / "m.sqlite"
    store = SqliteMetadataStore(path)
    kept = record()
    store.add([kept])
    store.check_health()
    with immutable(path, path.with_name(path.name + "-wal")):
        with fails_within(2) as caught:
            store.add([record()])
        assert "SQLITE_IOERR" in caught[0].message
        for _ in range(2):  # probed each time, not only remembered
            with pytest.raises(DependencyUnavailable, match="takes no writes"):
                store.check_health()
        assert store.find(kept.key_id) == kept
    store.check_health()
    later = record()
    store.add([later])
    assert store.list().records == [kept, later]
    store.close()


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DependencyUnavailable, match="SQLITE_NOTADB"):
        SqliteMetadataStore(path)


def test_sqlite_in_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable, match="SQLITE_CANTOPEN"):
        SqliteMetadataStore(tmp_path / "missing" / "m.sqlite")


def test_sqlite_closed_store(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.sqlite")
    store.close()
    with pytest.raises(DependencyUnavailable, match="closed"):
        store.find("anything")


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_store(postgres_dsn: str) -> Iterator[PostgresMetadataStore]:
    store = PostgresMetadataStore(postgres_dsn, statement_timeout=1, connect_timeout=2)
    yield store
    store.close()


def _operations(store: PostgresMetadataStore) -> list[Callable[[], object]]:
    return [
        lambda: store.find("anything"),
        lambda: store.list(),
        lambda: store.add([record()]),
        store.check_health,
    ]


def test_postgres_down_then_back(
    postgres_server: PostgresServer, postgres_dsn: str, pg_store: PostgresMetadataStore
) -> None:
    kept = record()
    pg_store.add([kept])
    postgres_server.stop()
    try:
        for operation in _operations(pg_store):
            with fails_within(2) as caught:
                operation()
            assert postgres_server.password not in caught[0].message
            assert "127.0.0.1" in caught[0].message
        with fails_within(3):
            PostgresMetadataStore(postgres_dsn, connect_timeout=2)
    finally:
        postgres_server.start()
    assert pg_store.find(kept.address) == kept
    later = record()
    pg_store.add([later])
    assert pg_store.list().records == [kept, later]


def test_postgres_restart_between_calls_is_invisible(
    postgres_server: PostgresServer, pg_store: PostgresMetadataStore
) -> None:
    """Pooled connections the restart closed are noticed and replaced before use."""
    kept = record()
    pg_store.add([kept])
    postgres_server.stop()
    postgres_server.start()
    assert pg_store.find(kept.key_id) == kept


def test_postgres_stuck_server_times_out_then_recovers(
    postgres_server: PostgresServer, postgres_dsn: str, pg_store: PostgresMetadataStore
) -> None:
    kept = record()
    pg_store.add([kept])
    postgres_server.pause()
    try:
        with fails_within(4) as caught:
            pg_store.find(kept.key_id)
        assert "no answer in time" in caught[0].message
        with fails_within(5):
            PostgresMetadataStore(postgres_dsn, connect_timeout=2)
    finally:
        postgres_server.resume()
    assert pg_store.find(kept.key_id) == kept


def test_postgres_health_names_a_stuck_server_within_its_own_bound(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """With the default statement timeout (5 s, so 6 s a round trip), a health check of a
    server that hangs still fails within HEALTH_WITHIN (2 s): /readyz names PostgreSQL
    before its own 5 s wait ends. Operations keep their usual bound."""
    store = PostgresMetadataStore(postgres_dsn)
    try:
        store.check_health()  # a connection in the pool, as on a serving node
        postgres_server.pause()
        try:
            with fails_within(HEALTH_WITHIN + 1.0) as caught:
                store.check_health()
            assert "PostgreSQL" in caught[0].message
            assert "no answer in time" in caught[0].message
        finally:
            postgres_server.resume()
        store.check_health()
    finally:
        store.close()


def _drop_idle_connections(dsn: str) -> None:
    """Terminate this database's signd connections (as an idle timeout or an administrator
    would), waiting until they are gone, so that the store's pool holds no usable idle
    connection."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = 'signd' AND datname = current_database()"
        )


def test_postgres_health_with_no_idle_connection_is_bounded_as_a_whole(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """With no idle connection in the pool, the health check connects anew: a server that
    hangs (it accepts the connection, then answers nothing) is still named within
    HEALTH_WITHIN, not after the store's connect timeout (5 s), which would outlast
    /readyz's own wait. The connection finished late joins the pool once the server answers."""
    store = PostgresMetadataStore(postgres_dsn)
    try:
        _drop_idle_connections(postgres_dsn)
        postgres_server.pause()
        try:
            for _ in range(2):  # a second check while the first one's connect still hangs
                with fails_within(HEALTH_WITHIN + 0.5) as caught:
                    store.check_health()
                assert "PostgreSQL" in caught[0].message
                assert "no answer in time" in caught[0].message
        finally:
            postgres_server.resume()
        store.check_health()
        kept = record()
        store.add([kept])
        assert store.find(kept.key_id) == kept
    finally:
        store.close()


def test_postgres_lock_wait_is_bounded(postgres_dsn: str, pg_store: PostgresMetadataStore) -> None:
    """A writer stuck behind another node's insert lock gives up after the statement timeout."""
    with psycopg.connect(postgres_dsn) as other_node:
        other_node.execute("LOCK TABLE key_records IN EXCLUSIVE MODE")
        with fails_within(3) as caught:
            pg_store.add([record()])
        assert "no answer in time" in caught[0].message
        assert pg_store.list().records == []
    pg_store.add([record()])
    assert len(pg_store.list().records) == 1


def test_postgres_wrong_password_does_not_leak_it(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn.replace(postgres_server.password, "wrong-secret-pw")
    with pytest.raises(DependencyUnavailable) as caught:
        PostgresMetadataStore(dsn, connect_timeout=2)
    assert "wrong-secret-pw" not in str(caught.value)
    assert "wrong-secret-pw" not in repr(caught.value.to_dict())


def test_postgres_closed_store(pg_store: PostgresMetadataStore) -> None:
    pg_store.close()
    with pytest.raises(DependencyUnavailable, match="closed"):
        pg_store.find("anything")
