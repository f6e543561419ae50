"""The keystore file: SQLite schema, the unlock header, and checks made before unlocking.

Nothing here walks the key records, so opening costs the same for ten keys or a million.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from signd.custody.keystore.sealing import SALT_SIZE, ScryptParams
from signd.errors import ConfigurationError, IntegrityError, InvalidField

SCHEMA_VERSION: Final = 1
MAGIC: Final = "signd-keystore"
KDF_NAME: Final = "scrypt"
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100

SCHEMA: Final = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE header (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    magic TEXT NOT NULL,
    kdf TEXT NOT NULL,
    salt BLOB NOT NULL,
    n INTEGER NOT NULL,
    r INTEGER NOT NULL,
    p INTEGER NOT NULL,
    check_value BLOB NOT NULL,
    digest BLOB NOT NULL
);
CREATE TABLE hd_wallets (
    wallet_id TEXT PRIMARY KEY,
    fingerprint BLOB NOT NULL UNIQUE,
    sealed_seed BLOB NOT NULL,
    sealed_mnemonic BLOB NOT NULL,
    is_default INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX hd_wallets_one_default ON hd_wallets (is_default) WHERE is_default = 1;
CREATE TABLE hd_counters (
    wallet_id TEXT NOT NULL REFERENCES hd_wallets (wallet_id),
    parent_path TEXT NOT NULL,
    next_index INTEGER NOT NULL,
    PRIMARY KEY (wallet_id, parent_path)
);
CREATE TABLE keys (
    seq INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    chain TEXT NOT NULL,
    address TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL,
    created_at TEXT NOT NULL,
    labels TEXT NOT NULL,
    wallet_id TEXT REFERENCES hd_wallets (wallet_id),
    hd_parent TEXT,
    hd_index INTEGER,
    hd_path TEXT,
    sealed_key BLOB,
    CHECK ((sealed_key IS NULL) = (wallet_id IS NOT NULL))
);
CREATE INDEX keys_by_hd_path ON keys (wallet_id, hd_parent, hd_index) WHERE wallet_id IS NOT NULL;
CREATE INDEX keys_by_chain ON keys (chain, seq);
CREATE TABLE key_labels (
    label TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES keys (seq),
    PRIMARY KEY (label, seq)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Header:
    """The unlock header: KDF parameters and the passphrase check value."""

    salt: bytes
    params: ScryptParams
    check_value: bytes

    @property
    def digest(self) -> bytes:
        """An unkeyed checksum that tells a corrupted header from a wrong passphrase."""
        fields = (MAGIC.encode(), KDF_NAME.encode(), self.salt, self.check_value)
        numbers = struct.pack(">QQQ", self.params.n, self.params.r, self.params.p)
        return hashlib.sha256(
            b"".join(struct.pack(">I", len(f)) + f for f in fields) + numbers
        ).digest()

    @property
    def keystore_id(self) -> str:
        """Which keystore this is: a digest of its random salt, the same in every copy of the
        file and different for every keystore created. Not a secret."""
        return hashlib.sha256(b"signd-keystore-id\0" + self.salt).hexdigest()[:32]


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread."""
    if read_only:
        target, uri = path.resolve().as_uri() + "?mode=ro", True
    else:
        target, uri = str(path), False
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def create_file(path: Path) -> None:
    """Create an empty file readable by its owner only; never replace an existing one."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise ConfigurationError(f"{path} already exists") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create keystore {path}: {exc.strerror}") from None


def initialise(conn: sqlite3.Connection, header: Header) -> None:
    """Create the schema and write the header, in one transaction."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute(
            "INSERT INTO header (id, magic, kdf, salt, n, r, p, check_value, digest)"
            " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                MAGIC,
                KDF_NAME,
                header.salt,
                header.params.n,
                header.params.r,
                header.params.p,
                header.check_value,
                header.digest,
            ),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def check_file(path: Path) -> None:
    """Cheap structural checks of the raw file before SQLite reads it (never writes)."""
    try:
        with path.open("rb") as raw:
            head = raw.read(_SQLITE_HEADER_SIZE)
            size = os.fstat(raw.fileno()).st_size
    except OSError as exc:
        raise ConfigurationError(f"cannot read keystore {path}: {exc.strerror}") from None
    if len(head) < _SQLITE_HEADER_SIZE or not head.startswith(_SQLITE_MAGIC):
        raise ConfigurationError(f"{path} is not a signd keystore")
    (page_size,) = struct.unpack_from(">H", head, 16)
    page_size = 65536 if page_size == 1 else page_size
    (change_counter, page_count) = struct.unpack_from(">II", head, 24)
    (valid_for,) = struct.unpack_from(">I", head, 92)
    wal = path.with_name(path.name + "-wal")
    wal_pending = wal.exists() and wal.stat().st_size > 0
    if change_counter == valid_for and not wal_pending and size < page_size * page_count:
        raise IntegrityError(f"keystore {path} is truncated")


def read_header(path: Path) -> Header:
    """Read and check the schema version and header through a read-only connection."""
    check_file(path)
    try:
        conn = connect(path, read_only=True)
    except sqlite3.Error:
        raise ConfigurationError(f"cannot open keystore {path}") from None
    try:
        version_rows = conn.execute("SELECT version FROM schema_version").fetchall()
        row = conn.execute(
            "SELECT magic, kdf, salt, n, r, p, check_value, digest FROM header WHERE id = 1"
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise ConfigurationError(f"{path} is not a signd keystore") from None
        raise IntegrityError(f"keystore {path} is corrupted") from None
    except sqlite3.DatabaseError:
        raise IntegrityError(f"keystore {path} is corrupted") from None
    finally:
        conn.close()
    if version_rows != [(SCHEMA_VERSION,)]:
        raise ConfigurationError(f"keystore {path} has an unsupported schema version")
    if row is None or row[0] != MAGIC or row[1] != KDF_NAME:
        raise ConfigurationError(f"{path} is not a signd keystore")
    salt, n, r, p, check_value, digest = row[2:]
    corrupted = IntegrityError(f"keystore {path} has a corrupted header")
    if not (isinstance(salt, bytes) and len(salt) == SALT_SIZE and isinstance(check_value, bytes)):
        raise corrupted
    try:
        header = Header(salt=salt, params=ScryptParams(n=n, r=r, p=p), check_value=check_value)
    except InvalidField:
        raise corrupted from None
    if header.digest != digest:
        raise corrupted
    return header


def keys_held(path: Path) -> int:
    """How many keys the keystore at ``path`` holds, read through a read-only connection:
    keys are never removed, so it is the last key's sequence number (one index lookup)."""
    try:
        conn = connect(path, read_only=True)
    except sqlite3.Error:
        raise ConfigurationError(f"cannot open keystore {path}") from None
    try:
        (held,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM keys").fetchone()
    except sqlite3.DatabaseError:
        raise IntegrityError(f"keystore {path} is corrupted") from None
    finally:
        conn.close()
    return int(held)
