"""The local keystore custody backend ("Wallet.data"): one SQLite file of sealed keys.

Imported private keys and HD seeds are sealed with AES-256-GCM under a key derived from the
passphrase (see :mod:`.sealing`). HD keys are stored as (wallet, BIP32 path) and public facts
only; signing re-derives them from the wallet's seed. Unsealed keys are cached in memory after
first use, so the signing hot path is one dict lookup and one libsecp256k1 call. Given a
metadata store, a keystore is checked against what it records of the keystore's path before
it is created or opened (see :mod:`.recorded`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Final, NamedTuple

import coincurve
from bip_utils import Bip32KeyError

from signd.crypto.secp256k1 import RecoverableSignature, sign_digest_with, sign_digests_with
from signd.crypto.secret import Secret
from signd.custody.base import (
    AddressDeriver,
    CustodyBackend,
    KeyInfo,
    KeyPage,
    check_labels,
    new_key_id,
    utc_now,
)
from signd.custody.keystore.hd import (
    HARDENED,
    HDWallet,
    KeyPath,
    bip44_receive_parent,
    format_path,
    new_mnemonic,
    normalize_mnemonic,
    parse_path,
    seed_from_mnemonic,
)
from signd.custody.keystore.recorded import record_keystore, refuse_if_keys_recorded
from signd.custody.keystore.schema import (
    Header,
    connect,
    create_file,
    initialise,
    keys_held,
    read_header,
)
from signd.custody.keystore.sealing import (
    SALT_SIZE,
    RecordSealer,
    ScryptParams,
    derive_passphrase_key,
    record_context,
)
from signd.custody.keystore.web3_keystore import decrypt_keystore_v3
from signd.errors import (
    CapacityExceeded,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyExists,
    KeyNotFound,
    SigndError,
)
from signd.storage.base import MetadataStore
from signd.storage.sqlite import probe_write

logger = logging.getLogger(__name__)

MAX_CREATE_COUNT: Final = 1_000_000
MAX_PAGE_SIZE: Final = 1000
PROGRESS_EVERY: Final = 500
_CHAIN_NAME: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")
_KEYS_HELD: Final = "SELECT COALESCE(MAX(seq), 0) FROM keys"
_SELECT_KEYS: Final = (
    "SELECT seq, key_id, chain, address, public_key, created_at, labels,"
    " wallet_id, hd_path, sealed_key FROM keys"
)


class _NewKey(NamedTuple):
    info: KeyInfo
    wallet_id: str | None = None
    hd_parent: str | None = None
    hd_index: int | None = None
    sealed_key: bytes | None = None


PassphraseSource = Callable[[bool], Secret]
"""Gives the keystore passphrase; told whether the keystore is being created."""


class KeystoreBackend(CustodyBackend):
    """Keys in a passphrase-sealed SQLite file; open one with :meth:`open`."""

    custody_type: ClassVar[str] = "keystore"

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        sealer: RecordSealer,
        *,
        keystore_id: str,
        metadata: MetadataStore | None = None,
    ) -> None:
        """Wrap an unlocked keystore; use :meth:`open` rather than calling this."""
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._sealer: RecordSealer | None = sealer
        self._cursors = sealer.cursor_codec()
        self._keystore_id = keystore_id
        self._metadata = metadata
        """Where the keystore's key count is recorded after each write that adds keys."""
        self._lock = threading.RLock()
        self._signers: dict[str, coincurve.PrivateKey] = {}
        self._wallets: dict[str, HDWallet] = {}
        self._write_failure: str | None = None
        """Why the last write failed, until a write succeeds (see :meth:`check_health`)."""
        self._identity = _file_identity(path)
        """The device and inode of the file opened: SQLite holds it open by descriptor, so
        a file deleted or replaced at ``path`` would go on taking writes no one will read."""

    @classmethod
    def open(
        cls,
        path: Path,
        passphrase: Secret | PassphraseSource,
        *,
        create: bool = True,
        kdf_params: ScryptParams | None = None,
        metadata: MetadataStore | None = None,
    ) -> KeystoreBackend:
        """Unlock the keystore at ``path``, creating it first if missing and ``create``.

        ``passphrase`` is the passphrase, or a source asked for it only once the keystore may
        be opened. ``kdf_params`` apply to a new keystore only; an existing one keeps its own.
        A file that fails to open is never modified.

        With ``metadata``, the keystore is checked against what that store records of its
        path first (:mod:`.recorded`): a missing keystore whose keys are recorded is not
        created, and a file that is another keystore, or holds fewer keys than recorded, is
        not opened (DependencyUnavailable). The backend then records its key count there
        after each write that adds keys, and closes ``metadata`` when it closes; if opening
        fails, ``metadata`` is the caller's to close.
        """
        path = Path(path)
        if not callable(passphrase):
            _passphrase(passphrase, creating=False)  # refused before anything is read
        if not path.exists():
            if not create:
                raise ConfigurationError(f"no keystore at {path}")
            if metadata is not None:
                refuse_if_keys_recorded(path, metadata)
            backend = cls._create(
                path, _passphrase(passphrase, creating=True), kdf_params or ScryptParams()
            )
            if metadata is not None:
                try:
                    record_keystore(path, backend._keystore_id, lambda: 0, metadata)
                except BaseException:
                    backend.close()
                    raise
                backend._metadata = metadata
            return backend
        header = read_header(path)
        if metadata is not None:
            record_keystore(path, header.keystore_id, partial(keys_held, path), metadata)
        secret = _passphrase(passphrase, creating=False)
        sealer = RecordSealer(derive_passphrase_key(secret, header.salt, header.params))
        try:
            sealer.verify_check_value(header.check_value)
        except SigndError:
            logger.warning("wrong passphrase for keystore %s", path)  # safe: a path
            raise
        try:
            conn = connect(path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error:
            raise DependencyUnavailable(f"cannot open keystore {path} for writing") from None
        logger.info("opened keystore %s", path)
        return cls(path, conn, sealer, keystore_id=header.keystore_id, metadata=metadata)

    @classmethod
    def _create(cls, path: Path, passphrase: Secret, params: ScryptParams) -> KeystoreBackend:
        salt = os.urandom(SALT_SIZE)
        sealer = RecordSealer(derive_passphrase_key(passphrase, salt, params))
        header = Header(salt=salt, params=params, check_value=sealer.check_value())
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigurationError(f"cannot create keystore {path}: {exc.strerror}") from None
        create_file(path)
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(path)
            initialise(conn, header)
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
                leftover.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.Error):
                raise DependencyUnavailable(f"cannot create keystore {path}") from None
            raise
        logger.info(
            "created keystore %s (scrypt n=%d r=%d p=%d)", path, params.n, params.r, params.p
        )
        return cls(path, conn, sealer, keystore_id=header.keystore_id)

    @property
    def path(self) -> Path:
        return self._path

    # -- creating and importing keys ---------------------------------------------------------

    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        """Derive the next ``count`` BIP44 receiving keys of the default HD wallet.

        The default wallet is created from a fresh 24-word mnemonic on first use. Only the
        path, public key and address are stored; the keys are inserted in one transaction.
        """
        parent = bip44_receive_parent(_check_chain(chain))
        if not isinstance(count, int) or isinstance(count, bool):
            raise InvalidField("count must be an integer", field="count")
        if not 1 <= count <= MAX_CREATE_COUNT:
            raise InvalidField(f"count must be 1-{MAX_CREATE_COUNT}", field="count")
        labels = check_labels(labels)
        parent_path = format_path(parent)
        created: list[KeyInfo] = []
        with self._transaction() as conn:
            wallet_id = self._default_wallet_id(conn)
            parent_node = self._wallet(conn, wallet_id).parent(parent)
            row = conn.execute(
                "SELECT next_index FROM hd_counters WHERE wallet_id = ? AND parent_path = ?",
                (wallet_id, parent_path),
            ).fetchone()
            start = row[0] if row else 0
            used = {
                index
                for (index,) in conn.execute(
                    "SELECT hd_index FROM keys"
                    " WHERE wallet_id = ? AND hd_parent = ? AND hd_index >= ?",
                    (wallet_id, parent_path, start),
                )
            }
            now = utc_now()
            pending: list[_NewKey] = []
            index = start - 1
            while len(created) < count:
                index += 1
                if index >= HARDENED:
                    raise CapacityExceeded(f"no unhardened BIP32 index left under {parent_path}")
                if index in used:
                    continue
                try:
                    public_key = parent_node.ChildKey(index).PublicKey().RawCompressed().ToBytes()
                except Bip32KeyError:
                    continue  # BIP32: an index whose child key is invalid is skipped
                info = KeyInfo(
                    key_id=new_key_id(),
                    chain=chain,
                    address=_derive_address(address_of, bytes(public_key)),
                    public_key=bytes(public_key),
                    custody=self.custody_type,
                    created_at=now,
                    labels=labels,
                    details={"hd_path": f"{parent_path}/{index}", "wallet_id": wallet_id},
                )
                created.append(info)
                pending.append(_NewKey(info, wallet_id, parent_path, index))
                if len(pending) == PROGRESS_EVERY or len(created) == count:
                    self._insert_keys(conn, pending)
                    pending.clear()
                    if progress is not None:
                        progress(len(created))
            conn.execute(
                "INSERT INTO hd_counters (wallet_id, parent_path, next_index) VALUES (?, ?, ?)"
                " ON CONFLICT (wallet_id, parent_path)"
                " DO UPDATE SET next_index = excluded.next_index",
                (wallet_id, parent_path, index + 1),
            )
        self._record_keys_held(created)
        logger.info("created %d %s keys in keystore %s", count, chain, self._path)
        return created

    def import_private_key(
        self,
        chain: str,
        secret: Secret,
        address_of: AddressDeriver,
        labels: Sequence[str] = (),
    ) -> KeyInfo:
        """Import a raw 32-byte private key; it is stored sealed to its key id and address."""
        chain = _check_chain(chain)
        labels = check_labels(labels)
        if not isinstance(secret, Secret):
            raise InvalidField("the private key must be passed as a Secret", field="private_key")
        raw = secret.reveal_bytes()
        try:
            if len(raw) != 32:
                raise ValueError
            signer = coincurve.PrivateKey(raw)
        except ValueError:
            raise InvalidField(
                "private key must be a 32-byte secp256k1 scalar", field="private_key"
            ) from None
        public_key = signer.public_key.format(compressed=True)
        info = KeyInfo(
            key_id=new_key_id(),
            chain=chain,
            address=_derive_address(address_of, public_key),
            public_key=public_key,
            custody=self.custody_type,
            created_at=utc_now(),
            labels=labels,
            details={"origin": "imported"},
        )
        with self._transaction() as conn:
            sealed = self._require_sealer().seal(raw, _key_context(info))
            self._insert_keys(conn, [_NewKey(info, sealed_key=sealed)])
        self._signers[info.key_id] = signer
        self._record_keys_held([info])
        logger.info("imported %s key %s into keystore %s", chain, info.key_id, self._path)
        return info

    def import_keystore_json(
        self,
        chain: str,
        document: Mapping[str, Any] | str,
        password: Secret,
        address_of: AddressDeriver,
        labels: Sequence[str] = (),
    ) -> KeyInfo:
        """Import the key in an Ethereum keystore v3 file (scrypt or pbkdf2, AES-128-CTR)."""
        if not isinstance(password, Secret):
            raise InvalidField("the password must be passed as a Secret", field="password")
        private_key = decrypt_keystore_v3(document, password)
        return self.import_private_key(chain, Secret(private_key), address_of, labels)

    def import_mnemonic(
        self,
        chain: str,
        mnemonic: Secret,
        address_of: AddressDeriver,
        path: str | None = None,
        bip39_passphrase: Secret | None = None,
        labels: Sequence[str] = (),
    ) -> KeyInfo:
        """Add the key at ``path`` (default: the chain's BIP44 index 0) of a BIP39 mnemonic.

        A new HD wallet is stored for the mnemonic, or the one with the same seed is reused.
        """
        chain = _check_chain(chain)
        labels = check_labels(labels)
        indexes: KeyPath = (
            parse_path(path) if path is not None else (*bip44_receive_parent(chain), 0)
        )
        if not isinstance(mnemonic, Secret) or not (
            bip39_passphrase is None or isinstance(bip39_passphrase, Secret)
        ):
            raise InvalidField("the mnemonic and passphrase must be Secrets", field="mnemonic")
        words = normalize_mnemonic(mnemonic)
        seed = seed_from_mnemonic(words, bip39_passphrase)
        with self._transaction() as conn:
            sealer = self._require_sealer()
            row = conn.execute(
                "SELECT wallet_id FROM hd_wallets WHERE fingerprint = ?",
                (sealer.seed_fingerprint(seed),),
            ).fetchone()
            wallet_id = row[0] if row else self._add_wallet(conn, words, seed, is_default=False)
            try:
                node = self._wallet(conn, wallet_id).node(indexes)
            except Bip32KeyError:
                raise InvalidField("the path leads to an invalid BIP32 key", field="path") from None
            public_key = bytes(node.PublicKey().RawCompressed().ToBytes())
            hd_path = format_path(indexes)
            info = KeyInfo(
                key_id=new_key_id(),
                chain=chain,
                address=_derive_address(address_of, public_key),
                public_key=public_key,
                custody=self.custody_type,
                created_at=utc_now(),
                labels=labels,
                details={"hd_path": hd_path, "wallet_id": wallet_id},
            )
            new_key = _NewKey(info, wallet_id, format_path(indexes[:-1]), indexes[-1])
            self._insert_keys(conn, [new_key])
        self._record_keys_held([info])
        logger.info(
            "imported %s HD key %s (%s) into keystore %s", chain, info.key_id, hd_path, self._path
        )
        return info

    # -- dangerous exports -------------------------------------------------------------------

    def export_private_key_unsafe(self, ref: str) -> Secret:
        """The raw private key of a key: it leaves custody. Never expose this remotely."""
        info = self.get_key(ref)
        signer = self._load_signer(info.key_id)
        logger.warning("exported the private key of keystore key %s", info.key_id)  # safe: key id
        return Secret(signer.secret)

    def export_mnemonic_unsafe(self, wallet_id: str) -> Secret:
        """The mnemonic of an HD wallet (without any BIP39 passphrase it was imported with)."""
        with self._lock:
            row = self._fetchone(
                "SELECT sealed_mnemonic FROM hd_wallets WHERE wallet_id = ?", (wallet_id,)
            )
            if row is None:
                raise KeyNotFound(f"no HD wallet {wallet_id!r} in this keystore")
            words = self._require_sealer().open(row[0], record_context("mnemonic", wallet_id))
        logger.warning("exported the mnemonic of HD wallet %s", wallet_id)
        return Secret(words.decode())

    # -- lookups -----------------------------------------------------------------------------

    def find_key(self, ref: str) -> KeyInfo | None:
        """The key with this key id or exact address, or ``None``."""
        if not isinstance(ref, str) or not ref:
            return None
        with self._lock:
            row = self._fetchone(_SELECT_KEYS + " WHERE key_id = ?", (ref,))
            if row is None:
                row = self._fetchone(_SELECT_KEYS + " WHERE address = ?", (ref,))
        return None if row is None else self._key_info(row)

    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        """Keys in creation order, optionally of one chain and/or carrying one label. The
        cursor is bound to this keystore and to the filters it was given out for: any other
        is refused (InvalidField), as the metadata stores refuse theirs."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidField(f"limit must be 1-{MAX_PAGE_SIZE}", field="limit")
        filters = (self.custody_type, chain, label)
        sql = _SELECT_KEYS + " WHERE seq > ?"
        params: list[object] = [self._cursors.decode(cursor, filters) if cursor is not None else 0]
        if chain is not None:
            sql += " AND chain = ?"
            params.append(chain)
        if label is not None:
            sql += " AND seq IN (SELECT seq FROM key_labels WHERE label = ?)"
            params.append(label)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit + 1)
        with self._lock:
            try:
                rows = self._require_conn().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _storage_error(exc, self._path) from None
        more = len(rows) > limit
        rows = rows[:limit]
        return KeyPage(
            keys=[self._key_info(row) for row in rows],
            next_cursor=self._cursors.encode(rows[-1][0], filters) if more else None,
        )

    # -- signing -----------------------------------------------------------------------------

    def signs_locally(self, key: KeyInfo) -> bool:
        return key.key_id in self._signers

    def sign_many(
        self, pairs: Sequence[tuple[KeyInfo, bytes]]
    ) -> list[RecoverableSignature | SigndError]:
        """Keys all in memory sign on every core (:func:`sign_digests_with`); otherwise one
        by one, as :meth:`sign_digest` does."""
        in_memory: list[tuple[coincurve.PrivateKey, bytes]] = []
        for key, digest in pairs:
            secret = self._signers.get(key.key_id) if key.custody == self.custody_type else None
            if secret is None:
                return super().sign_many(pairs)
            in_memory.append((secret, digest))
        try:
            signed = sign_digests_with(in_memory)
        except SigndError:  # a digest that is not 32 bytes: let each say which
            return super().sign_many(pairs)
        return list(signed)

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> RecoverableSignature:
        signer = self._signers.get(key.key_id)
        if signer is None:
            signer = self._load_signer(key.key_id)
        return sign_digest_with(signer, digest)

    def _load_signer(self, key_id: str) -> coincurve.PrivateKey:
        """Unseal (or re-derive) a key, check it against its public key, and cache it."""
        with self._lock:
            signer = self._signers.get(key_id)
            if signer is not None:
                return signer
            row = self._fetchone(_SELECT_KEYS + " WHERE key_id = ?", (key_id,))
            if row is None:
                raise KeyNotFound(f"no keystore key {key_id!r}")
            info = self._key_info(row)
            wallet_id, hd_path, sealed_key = row[7:10]
            if sealed_key is not None:
                secret = self._require_sealer().open(sealed_key, _key_context(info))
            else:
                wallet = self._wallet(self._require_conn(), wallet_id)
                secret = wallet.private_key(parse_path(hd_path))
            signer = coincurve.PrivateKey(secret)
            if signer.public_key.format(compressed=True) != info.public_key:
                raise IntegrityError(f"keystore key {key_id} does not match its public key")
            self._signers[key_id] = signer
            return signer

    # -- lifecycle ---------------------------------------------------------------------------

    def check_health(self) -> None:
        """The database answers, and takes writes. A write that fails is remembered; until
        one succeeds, each check writes a change-nothing commit (:func:`probe_write`), so
        that the keystore is reported ready again once the disk takes writes, without
        waiting for a create. (A write rolled back never reaches the disk, so it would not
        tell.)"""
        with self._lock:
            self._check_file()
            try:
                self._require_conn().execute("SELECT 1 FROM header").fetchone()
            except sqlite3.Error:
                raise DependencyUnavailable(
                    f"the keystore database {self._path} does not answer"
                ) from None
            if self._write_failure is not None:
                try:
                    with self._transaction() as conn:
                        probe_write(conn)
                except DependencyUnavailable:
                    raise DependencyUnavailable(
                        f"the keystore takes no writes: {self._write_failure}"
                    ) from None

    def close(self) -> None:
        """Drop cached keys and seeds and close the database (and the metadata store)."""
        with self._lock:
            self._signers.clear()
            self._wallets.clear()
            self._sealer = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            metadata, self._metadata = self._metadata, None
        if metadata is not None:
            metadata.close()

    def __enter__(self) -> KeystoreBackend:
        return self

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"KeystoreBackend(path={str(self._path)!r}, {state})"

    # -- internals ---------------------------------------------------------------------------

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DependencyUnavailable("the keystore is closed")
        return self._conn

    def _require_sealer(self) -> RecordSealer:
        if self._sealer is None:
            raise DependencyUnavailable("the keystore is closed")
        return self._sealer

    def _fetchone(self, sql: str, params: tuple[object, ...]) -> Any:
        try:
            return self._require_conn().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise _storage_error(exc, self._path) from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the backend lock; storage errors are translated,
        and a write the database refused is remembered until one succeeds.

        A COMMIT that fails on an I/O error has been rolled back by SQLite already, so the
        transaction is rolled back only while one is open."""
        with self._lock:
            conn = self._require_conn()
            self._check_file()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._write_failed(exc) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._write_failed(exc) from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if self._write_failure is not None:
                logger.warning("keystore %s takes writes again", self._path)
                self._write_failure = None

    def _record_keys_held(self, made: Sequence[KeyInfo]) -> None:
        """Once keys are committed, record how many the keystore holds (:mod:`.recorded`).
        If that fails, the caller gets the error and none of the keys: they stay in the
        keystore, unused, and are counted at the next recording."""
        if self._metadata is None:
            return
        try:
            record_keystore(self._path, self._keystore_id, self._keys_held, self._metadata)
        except SigndError as exc:
            logger.warning(
                "%d key(s) were made in keystore %s but not recorded in the metadata store "
                "(the request was refused, their addresses given to no one): %s; %s",
                len(made),
                self._path,
                ", ".join(key.key_id for key in made),
                exc.message,
            )
            raise

    def _keys_held(self) -> int:
        with self._lock:
            (held,) = self._fetchone(_KEYS_HELD, ())
        return int(held)

    def _check_file(self) -> None:
        """Refuse while the file at the keystore's path is not the one open (deleted,
        renamed away or replaced): only a restart on the right file can serve it."""
        if _file_identity(self._path) != self._identity:
            raise DependencyUnavailable(
                f"the keystore open is not the file at {self._path} (deleted or replaced "
                "while signd runs): put it back, or restart signd"
            )

    def _write_failed(self, exc: sqlite3.Error) -> SigndError:
        """``exc`` translated; a database that refused the write is remembered as such."""
        error = _storage_error(exc, self._path)
        if isinstance(error, DependencyUnavailable):
            if self._write_failure is None:
                logger.error("keystore %s refused a write: %s", self._path, error.message)
            self._write_failure = error.message
        return error

    def _insert_keys(self, conn: sqlite3.Connection, keys: Sequence[_NewKey]) -> None:
        (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM keys").fetchone()
        rows: list[tuple[object, ...]] = []
        label_rows: list[tuple[str, int]] = []
        for offset, key in enumerate(keys):
            info = key.info
            rows.append(
                (
                    seq + offset,
                    info.key_id,
                    info.chain,
                    info.address,
                    info.public_key,
                    info.created_at.isoformat(),
                    json.dumps(list(info.labels)),
                    key.wallet_id,
                    key.hd_parent,
                    key.hd_index,
                    info.details.get("hd_path"),
                    key.sealed_key,
                )
            )
            label_rows.extend((label, seq + offset) for label in info.labels)
        conn.executemany(
            "INSERT INTO keys (seq, key_id, chain, address, public_key, created_at, labels,"
            " wallet_id, hd_parent, hd_index, hd_path, sealed_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany("INSERT INTO key_labels (label, seq) VALUES (?, ?)", label_rows)

    def _default_wallet_id(self, conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT wallet_id FROM hd_wallets WHERE is_default = 1").fetchone()
        if row is not None:
            return str(row[0])
        words = new_mnemonic()
        return self._add_wallet(conn, words, seed_from_mnemonic(words), is_default=True)

    def _add_wallet(
        self, conn: sqlite3.Connection, words: Secret, seed: bytes, *, is_default: bool
    ) -> str:
        sealer = self._require_sealer()
        wallet_id = new_key_id()
        conn.execute(
            "INSERT INTO hd_wallets"
            " (wallet_id, fingerprint, sealed_seed, sealed_mnemonic, is_default, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                wallet_id,
                sealer.seed_fingerprint(seed),
                sealer.seal(seed, record_context("seed", wallet_id)),
                sealer.seal(words.reveal_bytes(), record_context("mnemonic", wallet_id)),
                int(is_default),
                utc_now().isoformat(),
            ),
        )
        self._wallets[wallet_id] = HDWallet(seed)
        logger.info("added HD wallet %s to keystore %s", wallet_id, self._path)
        return wallet_id

    def _wallet(self, conn: sqlite3.Connection, wallet_id: str) -> HDWallet:
        """The unsealed HD wallet, cached after the first use."""
        wallet = self._wallets.get(wallet_id)
        if wallet is None:
            row = conn.execute(
                "SELECT sealed_seed FROM hd_wallets WHERE wallet_id = ?", (wallet_id,)
            ).fetchone()
            if row is None:
                raise IntegrityError(f"HD wallet {wallet_id} is missing from the keystore")
            seed = self._require_sealer().open(row[0], record_context("seed", wallet_id))
            wallet = self._wallets[wallet_id] = HDWallet(seed)
        return wallet

    def _key_info(self, row: Sequence[Any]) -> KeyInfo:
        _seq, key_id, chain, address, public_key, created_at, labels, wallet_id, hd_path = row[:9]
        details = (
            {"hd_path": hd_path, "wallet_id": wallet_id}
            if wallet_id is not None
            else {"origin": "imported"}
        )
        return KeyInfo(
            key_id=key_id,
            chain=chain,
            address=address,
            public_key=bytes(public_key),
            custody=self.custody_type,
            created_at=datetime.fromisoformat(created_at),
            labels=tuple(json.loads(labels)),
            details=details,
        )


def _passphrase(source: Secret | PassphraseSource, *, creating: bool) -> Secret:
    """The passphrase given, or asked of its source; a non-empty Secret, else InvalidField."""
    passphrase = source(creating) if callable(source) else source
    if not isinstance(passphrase, Secret) or not passphrase:
        raise InvalidField("passphrase must be a non-empty Secret", field="passphrase")
    return passphrase


def _file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``, or ``None`` if there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _check_chain(chain: str) -> str:
    if not isinstance(chain, str) or not _CHAIN_NAME.fullmatch(chain):
        raise InvalidField("chain must be a lower-case chain name", field="chain")
    return chain


def _derive_address(address_of: AddressDeriver, public_key: bytes) -> str:
    address = address_of(public_key)
    if not isinstance(address, str) or not address:
        raise InvalidField("address_of must return a non-empty string", field="address")
    return address


def _key_context(info: KeyInfo) -> bytes:
    """What a sealed private key is bound to: its key id, chain, address and public key."""
    return record_context("key", info.key_id, info.chain, info.address, info.public_key)


def _storage_error(exc: sqlite3.Error, path: Path) -> SigndError:
    """Translate an SQLite error: a uniqueness clash, an unavailable file (named, with
    SQLite's reason: a disk I/O error, a lock held elsewhere, a full disk), or corruption."""
    if isinstance(exc, sqlite3.IntegrityError):
        return KeyExists("a key with that address is already held")
    if isinstance(exc, sqlite3.OperationalError):
        reason = getattr(exc, "sqlite_errorname", None) or str(exc)
        return DependencyUnavailable(f"the keystore database {path} is unavailable ({reason})")
    return IntegrityError("the keystore database is corrupted")
