"""Passphrase-derived keys and AES-256-GCM sealing of keystore records.

The passphrase goes through scrypt (parameters and salt stored in the file); HKDF splits the
result into a record-sealing key and a seed-fingerprint key. Every sealed record carries its
context (record kind and the public facts it belongs to: key id, chain, address, ...) as AEAD
associated data, so a ciphertext moved to another record fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from signd.crypto.secret import Secret
from signd.errors import IntegrityError, InvalidField, WrongPassphrase
from signd.storage.metadata import CursorCodec

SALT_SIZE: Final = 16
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
SEAL_VERSION: Final = b"\x01"
MAX_SCRYPT_MEMORY: Final = 1 << 30
_CONTEXT_PREFIX: Final = b"signd-keystore/v1/"
_CHECK_PLAINTEXT: Final = b"signd keystore passphrase check"


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost parameters; the default costs about half a second and 128 MiB.

    Tests may pass cheap ones (e.g. ``ScryptParams(n=2**10)``); they apply when a keystore
    is created and are stored in it.
    """

    n: int = 2**17
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "r", "p"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidField(f"scrypt {name} must be a positive integer", field="kdf_params")
        if self.n < 2 or self.n & (self.n - 1):
            raise InvalidField("scrypt n must be a power of two", field="kdf_params")
        if self.r > 32 or self.p > 16 or self.memory > MAX_SCRYPT_MEMORY:
            raise InvalidField("scrypt parameters are too costly", field="kdf_params")

    @property
    def memory(self) -> int:
        """Bytes of memory scrypt needs with these parameters."""
        return 128 * self.r * (self.n + self.p + 2)


def derive_passphrase_key(passphrase: Secret, salt: bytes, params: ScryptParams) -> bytes:
    """The 32-byte scrypt key of a passphrase."""
    return hashlib.scrypt(
        passphrase.reveal_bytes(),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        dklen=KEY_SIZE,
        maxmem=params.memory + (1 << 20),
    )


def record_context(kind: str, *fields: str | bytes) -> bytes:
    """Associated data for one record: its kind and length-prefixed public fields."""
    parts = [_CONTEXT_PREFIX, kind.encode()]
    for value in fields:
        data = value.encode() if isinstance(value, str) else value
        parts.append(struct.pack(">I", len(data)))
        parts.append(data)
    return b"".join(parts)


class RecordSealer:
    """Seals and opens records under the keys derived from the keystore passphrase."""

    __slots__ = ("_aead", "_cursor_key", "_fingerprint_key")

    def __init__(self, passphrase_key: bytes) -> None:
        self._aead = AESGCM(_subkey(passphrase_key, b"records"))
        self._fingerprint_key = _subkey(passphrase_key, b"seed fingerprint")
        self._cursor_key = _subkey(passphrase_key, b"list cursors")

    def cursor_codec(self) -> CursorCodec:
        """The codec of this keystore's listing cursors: authenticated under a key of its
        own, so a cursor altered, or given out by another keystore, is refused."""
        return CursorCodec(self._cursor_key)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """version ‖ nonce ‖ AES-256-GCM ciphertext and tag."""
        nonce = os.urandom(NONCE_SIZE)
        return SEAL_VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        """The plaintext of a sealed record; :class:`IntegrityError` if it fails to open."""
        if not isinstance(sealed, bytes) or sealed[:1] != SEAL_VERSION:
            raise IntegrityError("a keystore record failed its integrity check")
        nonce, body = sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, body, context)
        except (InvalidTag, ValueError):
            raise IntegrityError("a keystore record failed its integrity check") from None

    def check_value(self) -> bytes:
        """A sealed constant stored in the header to recognise the right passphrase."""
        return self.seal(_CHECK_PLAINTEXT, record_context("check"))

    def verify_check_value(self, sealed: bytes) -> None:
        """Raise :class:`WrongPassphrase` unless ``sealed`` opens under these keys."""
        try:
            plaintext = self.open(sealed, record_context("check"))
        except IntegrityError:
            raise WrongPassphrase("the passphrase does not open this keystore") from None
        if not hmac.compare_digest(plaintext, _CHECK_PLAINTEXT):
            raise WrongPassphrase("the passphrase does not open this keystore")

    def seed_fingerprint(self, seed: bytes) -> bytes:
        """A keyed fingerprint of an HD seed, to find a wallet already present."""
        return hmac.digest(self._fingerprint_key, seed, "sha256")

    def __repr__(self) -> str:
        return "RecordSealer(<keys>)"


def _subkey(passphrase_key: bytes, purpose: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=_CONTEXT_PREFIX + purpose
    )
    return hkdf.derive(passphrase_key)
