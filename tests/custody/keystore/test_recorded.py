"""A keystore file that goes missing, or is replaced by another or an older one, is refused
while the metadata store records keys of the keystore at its path; never created anew.

Real keystore files, a real SQLite metadata file and a real PostgreSQL: keys are made, the
file is moved away (as if deleted, or its volume not mounted) or swapped, and put back.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import coincurve
import pytest

from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo
from signd.custody.keystore import KeystoreBackend
from signd.custody.keystore.recorded import keystore_location
from signd.errors import DependencyUnavailable
from signd.storage.base import KeystoreRecord, MetadataStore
from tests.custody.keystore.conftest import (
    CHEAP_KDF,
    PASSPHRASE,
    eth_address,
    file_digest,
    open_keystore,
)
from tests.enclave.fakes import MemoryMetadataStore
from tests.fixtures.servers import (  # noqa: F401 - registers the fixtures
    PostgresServer,
    postgres_schema_dsn,
    postgres_server_fixture,
)

StoreFactory = Callable[[], MetadataStore]


@pytest.fixture(params=["sqlite", "postgres"])
def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens store objects on one metadata database of each kind (as each signd start does)."""
    opened: list[MetadataStore] = []
    if request.param == "sqlite":
        from signd.storage.sqlite import SqliteMetadataStore

        def factory() -> MetadataStore:
            opened.append(SqliteMetadataStore(tmp_path / "metadata.db"))
            return opened[-1]
    else:
        from signd.storage.postgres import PostgresMetadataStore

        dsn: str = request.getfixturevalue("postgres_schema_dsn")

        def factory() -> MetadataStore:
            opened.append(PostgresMetadataStore(dsn))
            return opened[-1]

    yield factory
    for store in opened:
        store.close()


def start(path: Path, metadata: MetadataStore) -> KeystoreBackend:
    """Open the keystore as ``signd`` does: created when missing, checked against metadata."""
    return KeystoreBackend.open(
        path, Secret(PASSPHRASE), create=True, kdf_params=CHEAP_KDF, metadata=metadata
    )


def signs(keystore: KeystoreBackend, key: KeyInfo) -> bool:
    """The key signs, and the signature recovers its public key."""
    digest = bytes(range(32))
    signature = keystore.sign_digest(key, digest)
    recovered = coincurve.PublicKey.from_signature_and_message(
        signature.to_bytes(), digest, hasher=None
    )
    return recovered.format(compressed=True) == key.public_key


def test_a_missing_keystore_whose_keys_are_recorded_is_refused_until_it_is_back(
    tmp_path: Path, metadata: StoreFactory
) -> None:
    path = tmp_path / "volume" / "wallet.data"
    keystore = start(path, metadata())
    keys = keystore.create_keys("ethereum", eth_address, count=2)
    [imported] = [keystore.import_private_key("ethereum", Secret(b"\x07" * 32), eth_address)]
    keystore.close()
    moved = tmp_path / "elsewhere.data"
    path.rename(moved)
    path.parent.rmdir()  # as a mount point that is not there
    for _ in range(2):  # refused at each try, never created meanwhile
        with pytest.raises(DependencyUnavailable) as refused:
            start(path, metadata())
        assert str(path) in refused.value.message
        assert "is missing, but 3 keys of it are recorded" in refused.value.message
        assert not path.parent.exists()
    path.parent.mkdir()
    moved.rename(path)
    keystore = start(path, metadata())
    assert keystore.list_keys().keys == [*keys, imported]
    assert all(signs(keystore, key) for key in [*keys, imported])
    keystore.close()


def test_a_fresh_home_creates_its_keystore_and_one_without_keys_may_be_made_again(
    tmp_path: Path, metadata: StoreFactory
) -> None:
    path = tmp_path / "wallet.data"
    store = metadata()
    keystore = start(path, store)
    recorded = store.keystore_record(keystore_location(path))
    assert recorded is not None and recorded.key_count == 0
    keystore.close()
    path.unlink()
    keystore = start(path, metadata())  # no key was ever recorded: nothing is lost
    [key] = keystore.create_keys("ethereum", eth_address)
    assert signs(keystore, key)
    keystore.close()


def test_another_keystore_in_the_place_of_the_recorded_one_is_refused(
    tmp_path: Path, metadata: StoreFactory
) -> None:
    """An older signd re-created a fresh keystore at the path while the recorded one was
    away, and made keys in it: it is refused, named as another keystore, and left as it is."""
    path = tmp_path / "wallet.data"
    keystore = start(path, metadata())
    recorded = keystore.create_keys("ethereum", eth_address, count=2)
    keystore.close()
    path.rename(tmp_path / "away.data")
    older_signd = open_keystore(path)  # no metadata: as signd did before
    older_signd.create_keys("ethereum", eth_address, count=3)
    older_signd.close()
    before = file_digest(path)
    with pytest.raises(DependencyUnavailable) as refused:
        start(path, metadata())
    message = refused.value.message
    assert f"{path} is not the keystore whose 2 keys are recorded" in message
    assert "holding 3 keys" in message
    assert file_digest(path) == before
    (tmp_path / "away.data").replace(path)
    keystore = start(path, metadata())
    assert all(signs(keystore, key) for key in recorded)
    keystore.close()


def test_an_older_copy_of_the_keystore_is_refused(tmp_path: Path, metadata: StoreFactory) -> None:
    path = tmp_path / "wallet.data"
    keystore = start(path, metadata())
    keystore.create_keys("ethereum", eth_address)
    keystore.close()
    shutil.copy(path, tmp_path / "backup.data")
    keystore = start(path, metadata())
    later = keystore.import_private_key("ethereum", Secret(b"\x09" * 32), eth_address)
    keystore.close()
    path.rename(tmp_path / "latest.data")
    shutil.copy(tmp_path / "backup.data", path)
    with pytest.raises(DependencyUnavailable) as refused:
        start(path, metadata())
    assert f"the keystore {path} holds 1 key, but 2 are recorded" in refused.value.message
    (tmp_path / "latest.data").replace(path)
    keystore = start(path, metadata())
    assert signs(keystore, later)
    keystore.close()


def test_a_keystore_made_before_it_was_recorded_is_recorded_when_opened(
    tmp_path: Path, metadata: StoreFactory
) -> None:
    """A keystore an earlier signd made (nothing recorded) is recorded at its first opening,
    and guarded from then on."""
    path = tmp_path / "wallet.data"
    earlier = open_keystore(path)
    earlier.create_keys("ethereum", eth_address, count=4)
    earlier.close()
    start(path, metadata()).close()
    path.unlink()
    with pytest.raises(DependencyUnavailable, match="4 keys of it are recorded"):
        start(path, metadata())
    assert not path.exists()


def test_no_keystore_is_created_while_the_metadata_store_cannot_say(tmp_path: Path) -> None:
    path = tmp_path / "wallet.data"
    store = MemoryMetadataStore()
    store.down = True
    with pytest.raises(DependencyUnavailable, match="cannot say whether keys of it are recorded"):
        start(path, store)
    assert not path.exists()
    store.down = False
    start(path, store).close()


def test_keys_made_while_the_metadata_store_is_down_are_not_handed_out_and_counted_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wallet.data"
    store = MemoryMetadataStore()
    keystore = start(path, store)
    keystore.create_keys("ethereum", eth_address)
    store.down = True
    with pytest.raises(DependencyUnavailable, match="cannot be checked against the metadata"):
        keystore.create_keys("ethereum", eth_address, count=2)
    store.down = False
    keystore.create_keys("ethereum", eth_address)
    where = keystore_location(path)
    assert store.keystore_record(where) == KeystoreRecord(
        where, store.keystores[where].keystore_id, 4
    )
    keystore.close()


def test_a_postgresql_that_is_down_refuses_a_missing_keystore(
    tmp_path: Path, postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> None:
    from signd.storage.postgres import PostgresMetadataStore

    path = tmp_path / "wallet.data"
    dsn: str = request.getfixturevalue("postgres_schema_dsn")
    store = PostgresMetadataStore(dsn, connect_timeout=2)
    try:
        postgres_server.stop()
        try:
            with pytest.raises(DependencyUnavailable) as refused:
                start(path, store)
            assert "PostgreSQL at 127.0.0.1" in refused.value.message
            assert not path.exists()
        finally:
            postgres_server.start()
        start(path, store).close()
    finally:
        store.close()


@pytest.mark.parametrize("first", ["create", "create beside another opening", "open"])
def test_keys_another_writer_records_meanwhile_do_not_make_the_file_look_older(
    tmp_path: Path, metadata: StoreFactory, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Two writers of one keystore file: threads of ``signd serve`` creating keys at once,
    or ``signd keys new`` beside it. The first counts the keys the file holds; before it
    records that count, the second commits more keys and records them. The first then finds
    more keys recorded than it counted: the file is no older copy, and neither the create
    nor the opening may be refused for it."""
    path = tmp_path / "wallet.data"
    store = metadata()
    keystore = start(path, store if first != "open" else metadata())
    keystore.create_keys("ethereum", eth_address)
    counted, go = threading.Event(), threading.Event()
    record = store.record_keystore

    def recorded_late(seen: KeystoreRecord) -> KeystoreRecord:
        """The first writer's recording (in the worker thread) waits for the second's."""
        if threading.current_thread() is not threading.main_thread():
            counted.set()
            assert go.wait(30)
        return record(seen)

    monkeypatch.setattr(store, "record_keystore", recorded_late)
    second = start(path, metadata()) if first == "create beside another opening" else keystore
    work: Callable[[], object] = (
        (lambda: start(path, store))
        if first == "open"
        else (lambda: keystore.create_keys("ethereum", eth_address))
    )
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(work)
        assert counted.wait(30)
        later = second.create_keys("ethereum", eth_address, count=2)
        go.set()
        made = outcome.result(timeout=30)
    if isinstance(made, KeystoreBackend):
        made.close()
    else:
        assert isinstance(made, list) and all(signs(keystore, key) for key in made)
    assert all(signs(keystore, key) for key in later)
    where = keystore_location(path)
    recorded = metadata().keystore_record(where)
    assert recorded is not None and recorded.key_count == (3 if first == "open" else 4)
    for opened in {id(keystore): keystore, id(second): second}.values():
        opened.close()
