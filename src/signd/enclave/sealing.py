"""The sealed-key blob: a private key under AES-256-GCM, its data key wrapped by KMS.

A blob is a canonical CBOR map (:class:`SealedKey`) holding only ciphertext and public facts.
The AEAD associated data binds the ciphertext to the blob format, version, algorithm, key id,
chain and address, so a blob moved to another key's name, or presented for another address,
fails to open. Every failure to open reads the same: :class:`signd.errors.IntegrityError`.

Many encodings are concatenated into one batch blob (:mod:`signd.enclave.signer`), and each is
read back by its byte range, so a range must hold exactly one encoding: trailing bytes after
the map are refused like any other deviation.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd.crypto.secret import Secret
from signd.errors import IntegrityError
from signd.kms.base import DATA_KEY_SIZE

BLOB_FORMAT: Final = "signd.enclave.sealed-key"
BLOB_VERSION: Final = 1
ALGORITHM: Final = "AES-256-GCM"
NONCE_SIZE: Final = 12
PRIVATE_KEY_SIZE: Final = 32
_TAG_SIZE: Final = 16
MAX_SEALED_SIZE: Final = 4096
"""The longest encoding :meth:`SealedKey.from_bytes` accepts."""


def associated_data(*, key_id: str, chain: str, address: str) -> bytes:
    """What a sealed key is bound to; any difference makes decryption fail."""
    return cbor2.dumps(
        [BLOB_FORMAT, BLOB_VERSION, ALGORITHM, key_id, chain, address], canonical=True
    )


@dataclass(frozen=True, slots=True)
class SealedKey:
    """The stored form of one enclave key. Nothing in it is secret."""

    kms_key_id: str
    encrypted_data_key: bytes
    nonce: bytes
    encrypted_private_key: bytes
    algorithm: str = ALGORITHM
    version: int = BLOB_VERSION

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            {
                "format": BLOB_FORMAT,
                "version": self.version,
                "algorithm": self.algorithm,
                "kms_key_id": self.kms_key_id,
                "encrypted_data_key": self.encrypted_data_key,
                "nonce": self.nonce,
                "encrypted_private_key": self.encrypted_private_key,
            },
            canonical=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedKey:
        """Parse a blob; anything but exactly one well-formed version-1 map is an IntegrityError."""
        corrupt = IntegrityError("sealed key blob failed its integrity check")
        if len(data) > MAX_SEALED_SIZE:
            raise corrupt
        stream = io.BytesIO(data)
        try:
            body: Any = cbor2.CBORDecoder(stream, max_depth=2, allow_duplicate_keys=False).decode()
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, LookupError):
            raise corrupt from None
        if stream.tell() != len(data):
            raise corrupt
        if not isinstance(body, dict) or body.get("format") != BLOB_FORMAT:
            raise corrupt
        fields = (
            body.get("version"),
            body.get("algorithm"),
            body.get("kms_key_id"),
            body.get("encrypted_data_key"),
            body.get("nonce"),
            body.get("encrypted_private_key"),
        )
        version, algorithm, kms_key_id, wrapped, nonce, ciphertext = fields
        if (
            version != BLOB_VERSION
            or algorithm != ALGORITHM
            or not isinstance(kms_key_id, str)
            or not isinstance(wrapped, bytes)
            or not isinstance(nonce, bytes)
            or len(nonce) != NONCE_SIZE
            or not isinstance(ciphertext, bytes)
            or len(ciphertext) != PRIVATE_KEY_SIZE + _TAG_SIZE
        ):
            raise corrupt
        return cls(kms_key_id, wrapped, nonce, ciphertext, algorithm, version)


def seal_private_key(
    secret: bytes,
    data_key: Secret,
    *,
    kms_key_id: str,
    encrypted_data_key: bytes,
    key_id: str,
    chain: str,
    address: str,
) -> SealedKey:
    """Encrypt a 32-byte private key under ``data_key`` with a fresh random nonce."""
    nonce = os.urandom(NONCE_SIZE)
    ad = associated_data(key_id=key_id, chain=chain, address=address)
    ciphertext = AESGCM(data_key.reveal_bytes()).encrypt(nonce, secret, ad)
    return SealedKey(kms_key_id, encrypted_data_key, nonce, ciphertext)


def unseal_private_key(
    sealed: SealedKey, data_key: Secret, *, key_id: str, chain: str, address: str
) -> bytes:
    """Decrypt a sealed private key; a wrong key, tampering or a swapped blob → IntegrityError."""
    key = data_key.reveal_bytes()
    if len(key) != DATA_KEY_SIZE:
        raise IntegrityError("sealed key blob failed its integrity check")
    ad = associated_data(key_id=key_id, chain=chain, address=address)
    try:
        return AESGCM(key).decrypt(sealed.nonce, sealed.encrypted_private_key, ad)
    except InvalidTag:
        raise IntegrityError("sealed key blob failed its integrity check") from None
