"""The embedded KMS: one AES-256 master key in a file under the signd home.

It follows the AWS ``GenerateDataKey``/``Decrypt`` semantics: a data key is wrapped with
AES-GCM under the master key, the encryption context is the associated data, and the wrapped
blob names the master key that made it. Blob format, version 1::

    b"SLK" | version (1 byte) | key id length (1 byte) | key id (UTF-8)
    | nonce (12 bytes) | AES-GCM(data key) + tag (48 bytes)

The associated data is everything before the nonce followed by the canonical JSON of the
encryption context, so neither the header nor the context can be changed unnoticed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError, InvalidField
from signd.kms.base import DATA_KEY_SIZE, DataKey, KmsClient

_MAGIC: Final = b"SLK"
_VERSION: Final = 1
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_KEY_FILE_VERSION: Final = 1
_ALIAS_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INTEGRITY_MESSAGE: Final = "data key ciphertext failed its integrity check"


def canonical_context(encryption_context: Mapping[str, str] | None) -> bytes:
    """The encryption context as canonical JSON (sorted keys, no spaces, UTF-8).

    ``None`` and an empty mapping are the same context, as in AWS KMS.
    """
    context = dict(encryption_context or {})
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidField(
                "encryption context keys and values must be strings", field="encryption_context"
            )
    return json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class LocalKms(KmsClient):
    """A file-backed master key; the default KMS of a single node."""

    kms_type = "local"

    def __init__(self, home: Path, *, key_alias: str = "signd-default") -> None:
        if not _ALIAS_PATTERN.fullmatch(key_alias):
            raise ConfigurationError(
                "local KMS key alias must be 1-64 letters, digits, '_' or '-'", field="key_alias"
            )
        self._path = Path(home) / "kms" / f"{key_alias}.key"
        if not self._path.exists():
            _create_key_file(self._path)
        self.key_id, master_key = _read_key_file(self._path)
        self._aead = AESGCM(master_key)
        self._header = _MAGIC + bytes([_VERSION, len(self.key_id)]) + self.key_id.encode()

    def __repr__(self) -> str:
        return f"LocalKms(path={str(self._path)!r}, key_id={self.key_id!r})"

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        aad = self._header + canonical_context(encryption_context)
        data_key = secrets.token_bytes(DATA_KEY_SIZE)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        blob = self._header + nonce + self._aead.encrypt(nonce, data_key, aad)
        return DataKey(plaintext=Secret(data_key), ciphertext=blob, kms_key_id=self.key_id)

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        header_size = len(self._header)
        expected_size = header_size + _NONCE_SIZE + DATA_KEY_SIZE + _TAG_SIZE
        if len(ciphertext) != expected_size or ciphertext[:header_size] != self._header:
            raise IntegrityError(_INTEGRITY_MESSAGE)
        nonce = ciphertext[header_size : header_size + _NONCE_SIZE]
        aad = self._header + canonical_context(encryption_context)
        try:
            data_key = self._aead.decrypt(nonce, ciphertext[header_size + _NONCE_SIZE :], aad)
        except InvalidTag:
            raise IntegrityError(_INTEGRITY_MESSAGE) from None
        return Secret(data_key)


def _create_key_file(path: Path) -> None:
    """Write a new master key file with mode 0600; a concurrent creator's file wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    content = json.dumps(
        {
            "version": _KEY_FILE_VERSION,
            "key_id": str(uuid.uuid4()),
            "key": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
    ).encode()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the local KMS master key file {path}") from exc
    finally:
        temporary.unlink(missing_ok=True)


def _read_key_file(path: Path) -> tuple[str, bytes]:
    """The key id and master key from ``path``, refusing files others could read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the local KMS master key file {path}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"local KMS master key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigurationError(
                f"local KMS master key {path} is accessible by group or others; chmod 600 it"
            )
        if info.st_uid != os.geteuid():
            raise ConfigurationError(f"local KMS master key {path} belongs to another user")
        with os.fdopen(os.dup(fd), "rb") as file:
            raw = file.read()
    finally:
        os.close(fd)
    try:
        document = json.loads(raw)
        key_id = document["key_id"]
        master_key = base64.b64decode(document["key"], validate=True)
        valid = (
            document["version"] == _KEY_FILE_VERSION
            and isinstance(key_id, str)
            and 0 < len(key_id.encode()) < 256
            and len(master_key) == 32
        )
    except (ValueError, TypeError, KeyError):
        valid = False
    if not valid:
        raise ConfigurationError(f"local KMS master key file {path} is malformed")
    return key_id, master_key
