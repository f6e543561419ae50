"""The keystore's disk refusing writes: 503 (DependencyUnavailable) naming the file, health
that says so until writes work again, and nothing half-written.

The faults are real: ``chattr +i`` on the database and its WAL (every write fails with
EPERM, as on a volume gone read-only). The ``-shm`` file is left alone: SQLite maps it, and
a write to a mapped page the kernel refuses kills the process with SIGBUS. One test stands
in for SQLite instead, for machines where ``chattr`` cannot run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from signd.crypto.secret import Secret
from signd.custody.keystore import KeystoreBackend
from signd.errors import DependencyUnavailable
from tests.custody.keystore.conftest import eth_address, open_keystore
from tests.fixtures.files import immutable

MNEMONIC = "legal winner thank year wave sausage worth useful legal winner thank yellow"


def database_files(path: Path) -> tuple[Path, Path]:
    return path, path.with_name(path.name + "-wal")


def test_a_refused_write_is_dependency_unavailable_until_the_disk_takes_writes(
    keystore: KeystoreBackend, keystore_path: Path
) -> None:
    """The commit fails (SQLite has rolled back already): 503 naming the keystore file, not
    SQLite's "cannot rollback" leaking out as a 500. Health reports the keystore unavailable
    while writes fail, though reads still answer, and ready again once the disk takes
    writes, before any create succeeds."""
    [kept] = keystore.create_keys("ethereum", eth_address)
    keystore.check_health()
    with immutable(*database_files(keystore_path)):
        with pytest.raises(DependencyUnavailable) as refused:
            keystore.create_keys("ethereum", eth_address, count=2)
        assert str(keystore_path) in refused.value.message
        with pytest.raises(DependencyUnavailable, match="writes") as unhealthy:
            keystore.check_health()
        assert str(keystore_path) in unhealthy.value.message
        with pytest.raises(DependencyUnavailable):  # probed again, not just remembered
            keystore.check_health()
        assert keystore.sign_digest(kept, bytes(32))  # reading still works
        assert keystore.list_keys().keys == [kept]
    keystore.check_health()
    [later] = keystore.create_keys("ethereum", eth_address)
    assert keystore.list_keys().keys == [kept, later]
    assert later.details["hd_path"] == "m/44'/60'/0'/0/1"


def test_a_refused_import_leaves_nothing_behind(
    keystore: KeystoreBackend, keystore_path: Path
) -> None:
    keystore.create_keys("ethereum", eth_address)
    with immutable(*database_files(keystore_path)), pytest.raises(DependencyUnavailable):
        keystore.import_mnemonic("ethereum", Secret(MNEMONIC), eth_address)
    keystore.close()
    with open_keystore(keystore_path, create=False) as reopened:
        assert len(reopened.list_keys().keys) == 1


class _FailingCommits:
    """A connection whose COMMIT fails as SQLite's does on an I/O error: it has rolled the
    transaction back itself by the time it raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self._conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)


def test_a_commit_that_rolled_itself_back_is_dependency_unavailable(
    keystore: KeystoreBackend, keystore_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = keystore._conn
    assert real is not None
    monkeypatch.setattr(keystore, "_conn", _FailingCommits(real))
    with pytest.raises(DependencyUnavailable, match=str(keystore_path)):
        keystore.create_keys("ethereum", eth_address)
    assert not real.in_transaction
    with pytest.raises(DependencyUnavailable):
        keystore.check_health()
    monkeypatch.setattr(keystore, "_conn", real)
    keystore.check_health()
    assert keystore.create_keys("ethereum", eth_address)


@pytest.mark.parametrize("replaced", [False, True], ids=["deleted", "replaced"])
def test_a_keystore_file_gone_from_its_path_is_unavailable(
    keystore: KeystoreBackend, keystore_path: Path, tmp_path: Path, replaced: bool
) -> None:
    """wallet.data deleted (or swapped for another file) while open: SQLite would go on
    writing into the unlinked file, so keys created now would be gone at the next start.
    Health says so and writes are refused (503); nothing is written at the path."""
    [kept] = keystore.create_keys("ethereum", eth_address)
    for path in [*database_files(keystore_path), keystore_path.with_name("wallet.data-shm")]:
        if replaced:
            path.rename(tmp_path / ("moved-" + path.name))
        else:
            path.unlink()
    if replaced:
        with open_keystore(keystore_path) as other:
            other.create_keys("ethereum", eth_address)
    with pytest.raises(DependencyUnavailable, match="not the file") as unhealthy:
        keystore.check_health()
    assert str(keystore_path) in unhealthy.value.message
    with pytest.raises(DependencyUnavailable, match="not the file"):
        keystore.create_keys("ethereum", eth_address)
    with pytest.raises(DependencyUnavailable, match="not the file"):
        keystore.import_private_key("ethereum", Secret(bytes(31) + b"\x01"), eth_address)
    assert keystore.sign_digest(kept, bytes(32))  # a key in memory still signs
    assert keystore_path.exists() is replaced
