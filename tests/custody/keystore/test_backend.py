"""The keystore backend: round trips, unlock failures, tampering, imports, listing, threads."""

from __future__ import annotations

import base64
import os
import sqlite3
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import coincurve
import pytest
from eth_account import Account

from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo
from signd.custody.keystore import KeystoreBackend, ScryptParams
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyExists,
    KeyNotFound,
    SigndError,
    WrongPassphrase,
)
from tests.custody.keystore.conftest import PASSPHRASE, eth_address, file_digest, open_keystore

Account.enable_unaudited_hdwallet_features()

KEY_A = bytes.fromhex("4646464646464646464646464646464646464646464646464646464646464646")
KEY_B = bytes.fromhex("0102030405060708091011121314151617181920212223242526272829303132")
TEST_MNEMONIC = "legal winner thank year wave sausage worth useful legal winner thank yellow"


def _recovers(info: KeyInfo, digest: bytes, signature: bytes) -> bool:
    recovered = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    return recovered.format(compressed=True) == info.public_key


# -- round trips ------------------------------------------------------------------------------


def test_create_sign_reopen_sign(keystore_path: Path) -> None:
    digest = os.urandom(32)
    seen: list[int] = []
    with open_keystore(keystore_path) as keystore:
        keys = keystore.create_keys("ethereum", eth_address, count=3, progress=seen.append)
        imported = keystore.import_private_key("ethereum", Secret(KEY_A), eth_address)
        first = {k.key_id: keystore.sign_digest(k, digest) for k in [*keys, imported]}
    assert seen[-1] == 3
    assert [k.details["hd_path"] for k in keys] == [f"m/44'/60'/0'/0/{i}" for i in range(3)]
    assert len({k.details["wallet_id"] for k in keys}) == 1
    for info in [*keys, imported]:
        assert _recovers(info, digest, first[info.key_id].to_bytes())
    with open_keystore(keystore_path, create=False) as keystore:
        for info in [*keys, imported]:
            assert keystore.sign_digest(info.key_id, digest) == first[info.key_id]
            assert keystore.get_key(info.address) == info


def test_created_keys_match_eth_account_derivation(keystore: KeystoreBackend) -> None:
    keys = keystore.create_keys("ethereum", eth_address, count=3)
    words = keystore.export_mnemonic_unsafe(keys[0].details["wallet_id"]).reveal()
    assert isinstance(words, str)
    assert len(words.split()) == 24
    for info in keys:
        account = Account.from_mnemonic(words, account_path=info.details["hd_path"])
        assert info.address == account.address
        assert keystore.export_private_key_unsafe(info.key_id).reveal_bytes() == account.key


def test_hd_indexes_continue_and_skip_imported_paths(keystore: KeystoreBackend) -> None:
    first = keystore.create_keys("ethereum", eth_address, count=2)
    wallet_id = first[0].details["wallet_id"]
    words = keystore.export_mnemonic_unsafe(wallet_id)
    imported = keystore.import_mnemonic("ethereum", words, eth_address, path="m/44'/60'/0'/0/3")
    assert imported.details["wallet_id"] == wallet_id  # the same seed reuses the wallet
    later = keystore.create_keys("ethereum", eth_address, count=2)
    assert [k.details["hd_path"][-2:] for k in later] == ["/2", "/4"]
    tron = keystore.create_keys("tron", lambda pk: "T" + pk.hex(), count=1)
    assert tron[0].details["hd_path"] == "m/44'/195'/0'/0/0"


def test_create_keys_validates_input(keystore: KeystoreBackend) -> None:
    for bad_count in (0, -1, True, 2_000_000):
        with pytest.raises(InvalidField):
            keystore.create_keys("ethereum", eth_address, count=bad_count)
    with pytest.raises(InvalidField):
        keystore.create_keys("dogecoin", eth_address)
    with pytest.raises(InvalidField):
        keystore.create_keys("ethereum", eth_address, labels="hot")
    with pytest.raises(InvalidField):
        keystore.create_keys("ethereum", lambda pk: "")
    assert keystore.list_keys().keys == []


# -- imports --------------------------------------------------------------------------------


def test_import_private_key_matches_eth_account(keystore: KeystoreBackend) -> None:
    info = keystore.import_private_key("ethereum", Secret(KEY_A), eth_address, labels=["cold"])
    assert info.address == Account.from_key(KEY_A).address
    assert info.labels == ("cold",)
    assert info.details == {"origin": "imported"}
    assert keystore.find_key(info.key_id) == info
    with pytest.raises(KeyExists):
        keystore.import_private_key("ethereum", Secret(KEY_A), eth_address)
    tron = keystore.import_private_key("tron", Secret(KEY_A), lambda pk: "T" + pk.hex())
    assert tron.public_key == info.public_key


@pytest.mark.parametrize("secret", [b"\x00" * 32, b"\xff" * 32, b"\x01" * 31, "0x" + "11" * 32])
def test_import_private_key_refuses_bad_scalars(keystore: KeystoreBackend, secret: object) -> None:
    with pytest.raises(InvalidField) as excinfo:
        keystore.import_private_key("ethereum", Secret(secret), eth_address)  # type: ignore[arg-type]
    assert excinfo.value.field == "private_key"


def test_import_mnemonic_matches_eth_account(keystore: KeystoreBackend) -> None:
    plain = keystore.import_mnemonic("ethereum", Secret(TEST_MNEMONIC), eth_address)
    assert plain.address == Account.from_mnemonic(TEST_MNEMONIC).address
    assert plain.details["hd_path"] == "m/44'/60'/0'/0/0"
    salted = keystore.import_mnemonic(
        "ethereum",
        Secret(TEST_MNEMONIC),
        eth_address,
        path="m/44'/60'/1'/0/7",
        bip39_passphrase=Secret("TREZOR"),
    )
    expected = Account.from_mnemonic(TEST_MNEMONIC, "TREZOR", account_path="m/44'/60'/1'/0/7")
    assert salted.address == expected.address
    assert salted.details["wallet_id"] != plain.details["wallet_id"]
    with pytest.raises(KeyExists):
        keystore.import_mnemonic("ethereum", Secret(TEST_MNEMONIC), eth_address)
    digest = os.urandom(32)
    assert _recovers(salted, digest, keystore.sign_digest(salted, digest).to_bytes())


@pytest.mark.parametrize(
    "words",
    [
        "abandon " * 11 + "abandon",  # bad checksum
        "abandon " * 11 + "notaword",
        "legal winner thank year",
        "",
    ],
)
def test_invalid_mnemonics(keystore: KeystoreBackend, words: str) -> None:
    with pytest.raises(InvalidField) as excinfo:
        keystore.import_mnemonic("ethereum", Secret(words), eth_address)
    assert excinfo.value.field == "mnemonic"


def test_import_mnemonic_refuses_bad_paths(keystore: KeystoreBackend) -> None:
    with pytest.raises(InvalidField) as excinfo:
        keystore.import_mnemonic("ethereum", Secret(TEST_MNEMONIC), eth_address, path="m")
    assert excinfo.value.field == "path"


# -- lookups and listing ----------------------------------------------------------------------


def test_find_key_by_id_or_address(keystore: KeystoreBackend) -> None:
    (info,) = keystore.create_keys("ethereum", eth_address)
    assert keystore.find_key(info.key_id) == info
    assert keystore.find_key(info.address) == info
    assert keystore.find_key(info.address.lower()) is None
    assert keystore.find_key("nope") is None
    with pytest.raises(KeyNotFound):
        keystore.get_key("nope")
    with pytest.raises(KeyNotFound):
        keystore.sign_digest("nope", bytes(32))
    with pytest.raises(KeyNotFound):
        keystore.export_mnemonic_unsafe("nope")


def test_pagination_and_filters(keystore: KeystoreBackend) -> None:
    hot = keystore.create_keys("ethereum", eth_address, count=4, labels=["hot", "eu"])
    cold = keystore.create_keys("ethereum", eth_address, count=3, labels=["cold"])
    tron = keystore.create_keys("tron", lambda pk: "T" + pk.hex(), count=2, labels=["hot"])
    everything = [*hot, *cold, *tron]
    pages, cursor = [], None
    while True:
        page = keystore.list_keys(limit=3, cursor=cursor)
        pages.append(page.keys)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 3]
    assert [k for p in pages for k in p] == everything
    assert keystore.list_keys(label="hot").keys == [*hot, *tron]
    assert keystore.list_keys(label="hot", chain="tron").keys == tron
    assert keystore.list_keys(chain="ethereum", limit=5).keys == [*hot, cold[0]]
    assert keystore.list_keys(label="missing").keys == []
    first = keystore.list_keys(label="hot", limit=2)
    rest = keystore.list_keys(label="hot", cursor=first.next_cursor)
    assert [*first.keys, *rest.keys] == [*hot, *tron]
    assert rest.next_cursor is None
    for bad in ("", "garbage!", "a2V5"):
        with pytest.raises(InvalidField):
            keystore.list_keys(cursor=bad)
    for bad_limit in (0, 1001):
        with pytest.raises(InvalidField):
            keystore.list_keys(limit=bad_limit)


def test_a_cursor_is_bound_to_its_keystore_and_filters(
    keystore: KeystoreBackend, tmp_path: Path
) -> None:
    """Listing cursors are authenticated: altered, forged (even past every key, a position
    SQLite cannot bind), given for other filters or by another keystore, each is refused."""
    hot = keystore.create_keys("ethereum", eth_address, count=3, labels=["hot"])
    keystore.create_keys("ethereum", eth_address, count=2, labels=["cold"])
    cursor = keystore.list_keys(label="hot", limit=1).next_cursor
    assert cursor is not None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    altered = {
        cursor[:at] + alphabet[(alphabet.index(char) + 1) % len(alphabet)] + cursor[at + 1 :]
        for at, char in enumerate(cursor)
    }
    forged = {
        base64.urlsafe_b64encode(b"k" + seq.to_bytes(8, "big")).decode().rstrip("=")
        for seq in (1, 2**63, 2**64 - 1)
    }
    for bad in altered | forged:
        with pytest.raises(InvalidField) as refused:
            keystore.list_keys(label="hot", cursor=bad)
        assert refused.value.field == "cursor"
    for chain, label in ((None, "cold"), (None, None), ("ethereum", "hot"), ("tron", "hot")):
        with pytest.raises(InvalidField, match="other filters"):
            keystore.list_keys(chain=chain, label=label, cursor=cursor)
    other = open_keystore(tmp_path / "other.data")
    try:
        other.create_keys("ethereum", eth_address, count=3, labels=["hot"])
        foreign = other.list_keys(label="hot", limit=1).next_cursor
    finally:
        other.close()
    assert foreign is not None
    with pytest.raises(InvalidField, match="not one this store issued"):
        keystore.list_keys(label="hot", cursor=foreign)
    assert keystore.list_keys(label="hot", cursor=cursor).keys == hot[1:]


# -- unlocking ------------------------------------------------------------------------------


def test_wrong_passphrase_leaves_the_file_alone(keystore_path: Path) -> None:
    with open_keystore(keystore_path) as keystore:
        keystore.create_keys("ethereum", eth_address, count=2)
    before = file_digest(keystore_path)
    with pytest.raises(WrongPassphrase):
        open_keystore(keystore_path, passphrase=PASSPHRASE + "x")
    assert file_digest(keystore_path) == before
    with open_keystore(keystore_path) as keystore:
        assert len(keystore.list_keys().keys) == 2


def test_missing_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "absent.data"
    with pytest.raises(ConfigurationError):
        open_keystore(path, create=False)
    assert not path.exists()


def test_empty_passphrase_is_refused(keystore_path: Path) -> None:
    with pytest.raises(InvalidField):
        KeystoreBackend.open(keystore_path, Secret(""))
    assert not keystore_path.exists()


def _populated(path: Path) -> list[KeyInfo]:
    with open_keystore(path) as keystore:
        return [
            *keystore.create_keys("ethereum", eth_address, count=2),
            keystore.import_private_key("ethereum", Secret(KEY_A), eth_address),
            keystore.import_private_key("ethereum", Secret(KEY_B), eth_address),
        ]


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_truncated_file(keystore_path: Path, fraction: float) -> None:
    _populated(keystore_path)
    data = keystore_path.read_bytes()
    keystore_path.write_bytes(data[: int(len(data) * fraction)])
    before = file_digest(keystore_path)
    expected = ConfigurationError if fraction == 0.0 else IntegrityError
    with pytest.raises(expected):
        open_keystore(keystore_path)
    assert file_digest(keystore_path) == before


def test_random_bytes_are_not_a_keystore(keystore_path: Path) -> None:
    keystore_path.write_bytes(os.urandom(8192))
    before = file_digest(keystore_path)
    with pytest.raises(ConfigurationError):
        open_keystore(keystore_path)
    assert file_digest(keystore_path) == before


def test_other_sqlite_database_is_not_a_keystore(keystore_path: Path) -> None:
    conn = sqlite3.connect(keystore_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = file_digest(keystore_path)
    with pytest.raises(ConfigurationError):
        open_keystore(keystore_path)
    assert file_digest(keystore_path) == before


def _tamper(path: Path, sql: str, *params: object) -> str:
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()
    return file_digest(path)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE header SET n = n * 2",
        "UPDATE header SET salt = zeroblob(16)",
        "UPDATE header SET check_value = substr(check_value, 1, 20) || zeroblob(8)",
        "UPDATE header SET salt = 'text'",
    ],
)
def test_corrupted_header(keystore_path: Path, sql: str) -> None:
    _populated(keystore_path)
    before = _tamper(keystore_path, sql)
    with pytest.raises(IntegrityError):
        open_keystore(keystore_path)
    assert file_digest(keystore_path) == before


def test_unsupported_schema_version(keystore_path: Path) -> None:
    _populated(keystore_path)
    before = _tamper(keystore_path, "UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigurationError):
        open_keystore(keystore_path)
    assert file_digest(keystore_path) == before


def _flip_byte_of(path: Path, blob: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(blob)
    assert at > 0
    assert data.find(blob, at + 1) == -1
    data[at + len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_key_ciphertext(keystore_path: Path) -> None:
    keys = _populated(keystore_path)
    conn = sqlite3.connect(keystore_path)
    (sealed,) = conn.execute(
        "SELECT sealed_key FROM keys WHERE key_id = ?", (keys[2].key_id,)
    ).fetchone()
    conn.close()
    _flip_byte_of(keystore_path, sealed)
    with open_keystore(keystore_path) as keystore:
        with pytest.raises(IntegrityError):
            keystore.sign_digest(keys[2], bytes(32))
        keystore.sign_digest(keys[3], bytes(32))  # other records are unaffected


def test_flipped_byte_in_a_seed_ciphertext(keystore_path: Path) -> None:
    keys = _populated(keystore_path)
    conn = sqlite3.connect(keystore_path)
    (sealed,) = conn.execute("SELECT sealed_seed FROM hd_wallets").fetchone()
    conn.close()
    _flip_byte_of(keystore_path, sealed)
    with open_keystore(keystore_path) as keystore:
        with pytest.raises(IntegrityError):
            keystore.sign_digest(keys[0], bytes(32))
        with pytest.raises(IntegrityError):
            keystore.create_keys("ethereum", eth_address)


def test_swapped_ciphertexts(keystore_path: Path) -> None:
    keys = _populated(keystore_path)
    a, b = keys[2].key_id, keys[3].key_id
    conn = sqlite3.connect(keystore_path)
    sealed = dict(
        conn.execute("SELECT key_id, sealed_key FROM keys WHERE key_id IN (?, ?)", (a, b))
    )
    conn.executemany(
        "UPDATE keys SET sealed_key = ? WHERE key_id = ?", [(sealed[b], a), (sealed[a], b)]
    )
    conn.commit()
    conn.close()
    with open_keystore(keystore_path) as keystore:
        for key_id in (a, b):
            with pytest.raises(IntegrityError):
                keystore.sign_digest(key_id, bytes(32))


def test_swapped_key_ids(keystore_path: Path) -> None:
    """Whole records traded between key ids: the public key still matches, the AEAD does not."""
    keys = _populated(keystore_path)
    a, b = keys[2].key_id, keys[3].key_id
    conn = sqlite3.connect(keystore_path)
    conn.execute("UPDATE keys SET key_id = 'swap' WHERE key_id = ?", (a,))
    conn.execute("UPDATE keys SET key_id = ? WHERE key_id = ?", (a, b))
    conn.execute("UPDATE keys SET key_id = ? WHERE key_id = 'swap'", (b,))
    conn.commit()
    conn.close()
    with open_keystore(keystore_path) as keystore:
        assert keystore.get_key(a).public_key == keys[3].public_key
        for key_id in (a, b):
            with pytest.raises(IntegrityError):
                keystore.sign_digest(key_id, bytes(32))


def test_swapped_seed_ciphertexts(keystore_path: Path) -> None:
    with open_keystore(keystore_path) as keystore:
        (created,) = keystore.create_keys("ethereum", eth_address)
        keystore.import_mnemonic("ethereum", Secret(TEST_MNEMONIC), eth_address)
    _tamper(
        keystore_path,
        "UPDATE hd_wallets SET sealed_seed ="
        " (SELECT sealed_seed FROM hd_wallets WHERE is_default = 0) WHERE is_default = 1",
    )
    with open_keystore(keystore_path) as keystore, pytest.raises(IntegrityError):
        keystore.sign_digest(created, bytes(32))


def test_hd_record_pointing_at_another_path(keystore_path: Path) -> None:
    keys = _populated(keystore_path)
    _tamper(
        keystore_path,
        "UPDATE keys SET hd_path = ? WHERE key_id = ?",
        "m/44'/60'/0'/0/1",
        keys[0].key_id,
    )
    with open_keystore(keystore_path) as keystore, pytest.raises(IntegrityError):
        keystore.sign_digest(keys[0], bytes(32))


def test_default_scrypt_parameters(keystore_path: Path) -> None:
    with KeystoreBackend.open(keystore_path, Secret(PASSPHRASE)) as keystore:
        (info,) = keystore.create_keys("ethereum", eth_address)
    conn = sqlite3.connect(keystore_path)
    assert conn.execute("SELECT n, r, p, length(salt) FROM header").fetchone() == (
        2**17,
        8,
        1,
        16,
    )
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    with KeystoreBackend.open(keystore_path, Secret(PASSPHRASE), create=False) as keystore:
        assert keystore.get_key(info.key_id) == info


def test_costly_kdf_parameters_are_refused() -> None:
    for params in ({"n": 1000}, {"n": 2**24}, {"r": 0}, {"p": 64}):
        with pytest.raises(InvalidField):
            ScryptParams(**params)


# -- lifecycle, threads and secrets -----------------------------------------------------------


def test_close_drops_cached_keys(keystore: KeystoreBackend) -> None:
    info = keystore.import_private_key("ethereum", Secret(KEY_A), eth_address)
    keystore.sign_digest(info, bytes(32))
    keystore.check_health()
    keystore.close()
    with pytest.raises(DependencyUnavailable):
        keystore.sign_digest(info, bytes(32))
    with pytest.raises(DependencyUnavailable):
        keystore.check_health()


def test_concurrent_signing_and_creation(keystore: KeystoreBackend) -> None:
    keys = [
        *keystore.create_keys("ethereum", eth_address, count=6),
        keystore.import_private_key("ethereum", Secret(KEY_A), eth_address),
    ]
    digests = [os.urandom(32) for _ in range(40)]
    failures: list[BaseException] = []
    start = threading.Barrier(9)

    def sign_all(offset: int) -> None:
        start.wait()
        try:
            for i, digest in enumerate(digests):
                info = keys[(i + offset) % len(keys)]
                signature = keystore.sign_digest(info, digest)
                if not _recovers(info, digest, signature.to_bytes()):
                    failures.append(AssertionError(info.key_id))
        except BaseException as exc:
            failures.append(exc)

    def create_more() -> None:
        start.wait()
        try:
            keystore.create_keys("ethereum", eth_address, count=200)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=sign_all, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=create_more))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(keystore.list_keys(limit=1000).keys) == 207


def test_secrets_never_leak(keystore_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    passphrase = "leak-canary-passphrase-9f8e7d"
    mnemonic_words = TEST_MNEMONIC
    secrets = [
        passphrase,
        KEY_A.hex(),
        KEY_A.hex()[:16],
        "winner thank year",
        "TREZOR-canary",
        "v3-canary-pw",
        KEY_B.hex(),
    ]
    texts: list[str] = []
    keystore = KeystoreBackend.open(
        keystore_path, Secret(passphrase), kdf_params=ScryptParams(n=2**10)
    )
    info = keystore.import_private_key("ethereum", Secret(KEY_A), eth_address)
    hd = keystore.import_mnemonic(
        "ethereum", Secret(mnemonic_words), eth_address, bip39_passphrase=Secret("TREZOR-canary")
    )
    texts += [repr(keystore), str(keystore), repr(info), str(info), repr(hd), str(info.to_dict())]
    texts += [repr(keystore.list_keys()), repr(keystore.export_private_key_unsafe(info.key_id))]
    texts.append(repr(keystore.export_mnemonic_unsafe(hd.details["wallet_id"])))
    document = Account.encrypt(KEY_B, "v3-canary-pw", kdf="pbkdf2", iterations=1000)
    failing_calls: list[Callable[[], object]] = [
        lambda: keystore.import_private_key("ethereum", Secret(KEY_A), eth_address),
        lambda: keystore.import_private_key("ethereum", Secret(KEY_A[:31]), eth_address),
        lambda: keystore.import_mnemonic("ethereum", Secret(mnemonic_words[:-1]), eth_address),
        lambda: keystore.import_mnemonic(
            "ethereum",
            Secret(mnemonic_words),
            eth_address,
            bip39_passphrase=Secret("TREZOR-canary"),
        ),
        lambda: KeystoreBackend.open(keystore_path, Secret(passphrase + "!")),
        lambda: keystore.import_keystore_json(
            "ethereum", document, Secret("v3-canary-pw!"), eth_address
        ),
    ]
    for call in failing_calls:
        with pytest.raises(SigndError) as excinfo:
            call()
        texts += [
            str(excinfo.value),
            repr(excinfo.value),
            "".join(traceback.format_exception(excinfo.value)),
        ]
    keystore.close()
    texts.append(caplog.text)
    assert "keystore" in caplog.text
    for text in texts:
        for secret in secrets:
            assert secret not in text
