"""The server's state on disk: keys, aliases and credentials, master keys sealed at rest.

Layout under the state directory (mode 0700, every file 0600)::

    kek                 the 32-byte key-encryption key, created once
    credentials.json    the access key callers sign requests with
    keys/<key id>.json  one key: metadata, policy, and its material sealed under the KEK
    aliases.json        alias name → key id

Key material (an AES-256 master key or a secp256k1 private scalar) is sealed with AES-GCM
under the KEK; the associated data binds it to its key id and key spec, so swapping two key
files' material is detected when the server loads them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd import files
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError
from signd.kms.server.errors import KmsApiError
from signd.kms.server.policy import KeyPolicy
from signd.kms.server.sigv4 import AccessKey

KEY_SPEC_SYMMETRIC: Final = "SYMMETRIC_DEFAULT"
KEY_SPEC_SECP256K1: Final = "ECC_SECG_P256K1"
USAGE_ENCRYPT_DECRYPT: Final = "ENCRYPT_DECRYPT"
USAGE_SIGN_VERIFY: Final = "SIGN_VERIFY"
MATERIAL_SIZE: Final = 32
_FILE_VERSION: Final = 1
_NONCE_SIZE: Final = 12
_KEK_FILE: Final = "kek"
_CREDENTIALS_FILE: Final = "credentials.json"
_ALIASES_FILE: Final = "aliases.json"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One KMS key. ``material`` is the AES key or the secp256k1 scalar (masked in reprs)."""

    key_id: str
    arn: str
    created: float
    description: str
    key_spec: str
    key_usage: str
    enabled: bool
    policy: KeyPolicy
    tags: tuple[tuple[str, str], ...]
    material: Secret


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, mode 0600."""
    files.replace(path, data)


def read_private_file(path: Path) -> bytes:
    """The bytes of a regular file that only this user can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"kms-server: cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigurationError(f"kms-server: {path} is not a regular file of this user")
        if info.st_mode & 0o077:
            raise ConfigurationError(f"kms-server: {path} is readable by others; chmod 600 it")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read()
    finally:
        os.close(fd)


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists (a concurrent creator's file wins)."""
    files.write_new(path, data)


def new_access_key(account: str) -> AccessKey:
    """Fresh credentials in AWS's shapes: a 20-character id and a 40-character secret."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    return AccessKey(key_id, Secret(secret), f"arn:aws:iam::{account}:user/signd-kms-server")


class KeyStore:
    """Keys kept in memory and written through to the state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            (self.directory / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            kek_path = self.directory / _KEK_FILE
            if not kek_path.exists():
                _create_exclusive(kek_path, secrets.token_bytes(MATERIAL_SIZE))
        except OSError as exc:
            raise ConfigurationError(
                f"kms-server: cannot prepare {self.directory}: {exc.strerror}"
            ) from None
        kek = read_private_file(kek_path)
        if len(kek) != MATERIAL_SIZE:
            raise ConfigurationError(f"kms-server: {kek_path} is not a 32-byte key")
        self._kek = AESGCM(kek)
        self._lock = threading.Lock()
        self._keys: dict[str, StoredKey] = {}
        self._aliases: dict[str, str] = {}
        for path in sorted((self.directory / "keys").glob("*.json")):
            key = self._decode(read_private_file(path))
            self._keys[key.key_id] = key
        aliases_path = self.directory / _ALIASES_FILE
        if aliases_path.exists():
            self._aliases = json.loads(read_private_file(aliases_path))

    def __repr__(self) -> str:
        return f"KeyStore(directory={str(self.directory)!r}, keys={len(self._keys)})"

    def access_key(self, account: str) -> AccessKey:
        """The server's credentials, created on first use."""
        path = self.directory / _CREDENTIALS_FILE
        if not path.exists():
            created = new_access_key(account)
            document = {
                "access_key_id": created.access_key_id,
                "secret_access_key": created.secret_access_key.reveal(),
                "principal_arn": created.principal_arn,
            }
            _create_exclusive(path, json.dumps(document).encode())
        try:
            document = json.loads(read_private_file(path))
            return AccessKey(
                str(document["access_key_id"]),
                Secret(str(document["secret_access_key"])),
                str(document["principal_arn"]),
            )
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(f"kms-server: {path} is malformed") from None

    def get(self, key_id: str) -> StoredKey | None:
        return self._keys.get(key_id)

    def keys(self) -> list[StoredKey]:
        """All keys in creation order."""
        with self._lock:
            return sorted(self._keys.values(), key=lambda key: (key.created, key.key_id))

    def put(self, key: StoredKey) -> None:
        """Store a new or changed key."""
        with self._lock:
            self._write(key)

    def _write(self, key: StoredKey) -> None:
        write_private_file(self.directory / "keys" / f"{key.key_id}.json", self._encode(key))
        self._keys[key.key_id] = key

    def _update(self, key: StoredKey, **changes: Any) -> StoredKey:
        """Change fields of the stored version of ``key`` (not of a stale copy), atomically."""
        with self._lock:
            changed = replace(self._keys.get(key.key_id, key), **changes)
            self._write(changed)
            return changed

    def set_enabled(self, key: StoredKey, enabled: bool) -> StoredKey:
        return self._update(key, enabled=enabled)

    def set_policy(self, key: StoredKey, policy: KeyPolicy) -> StoredKey:
        """Replace ``key``'s policy (PutKeyPolicy), written through like every other change."""
        return self._update(key, policy=policy)

    def alias(self, name: str) -> str | None:
        return self._aliases.get(name)

    def add_alias(self, name: str, key_id: str) -> bool:
        """Point ``name`` at ``key_id``; False if the alias exists already."""
        with self._lock:
            if name in self._aliases:
                return False
            aliases = {**self._aliases, name: key_id}
            write_private_file(self.directory / _ALIASES_FILE, json.dumps(aliases).encode())
            self._aliases = aliases
            return True

    @staticmethod
    def new_key_id() -> str:
        return str(uuid.uuid4())

    def _encode(self, key: StoredKey) -> bytes:
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = self._kek.encrypt(nonce, key.material.reveal_bytes(), _aad(key))
        document: dict[str, Any] = {
            "version": _FILE_VERSION,
            "key_id": key.key_id,
            "arn": key.arn,
            "created": key.created,
            "description": key.description,
            "key_spec": key.key_spec,
            "key_usage": key.key_usage,
            "enabled": key.enabled,
            "policy": key.policy.document,
            "tags": [list(tag) for tag in key.tags],
            "material": base64.b64encode(nonce + sealed).decode(),
        }
        return json.dumps(document).encode()

    def _decode(self, raw: bytes) -> StoredKey:
        try:
            document = json.loads(raw)
            if document["version"] != _FILE_VERSION:
                raise ValueError("unknown version")
            key = StoredKey(
                key_id=str(document["key_id"]),
                arn=str(document["arn"]),
                created=float(document["created"]),
                description=str(document["description"]),
                key_spec=str(document["key_spec"]),
                key_usage=str(document["key_usage"]),
                enabled=bool(document["enabled"]),
                policy=KeyPolicy.parse(str(document["policy"])),
                tags=tuple((str(k), str(v)) for k, v in document["tags"]),
                material=Secret(b""),
            )
            blob = base64.b64decode(document["material"], validate=True)
            material = self._kek.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _aad(key))
        except (ValueError, KeyError, TypeError, InvalidTag, KmsApiError):
            raise IntegrityError("kms-server: a key file failed its integrity check") from None
        return replace(key, material=Secret(material))


def _aad(key: StoredKey) -> bytes:
    return f"signd-kms-server/v{_FILE_VERSION}/{key.key_id}/{key.key_spec}".encode()
