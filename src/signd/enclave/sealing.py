"""The sealed-key blob: a private key under AES-256-GCM, its data key wrapped by KMS.

A blob is a canonical CBOR map (:class:`SealedKey`) holding only ciphertext and public facts.
The AEAD associated data binds the ciphertext to the blob format, version, algorithm, key id,
chain, address and (from version 2) the key's labels, so a blob moved to another key's name,
presented for another address, or claimed under other labels fails to open. Every failure to
open reads the same: :class:`signd.errors.IntegrityError`.

**Labels.** Policy rules select keys by label, and the host, which keeps the key records, is
not trusted: binding the labels in the blob lets the enclave prove a key's labels when it
unseals it. The bound form is :func:`signd.enclave.protocol.canonical_labels` (validated,
de-duplicated, sorted). A version-1 blob binds no labels: it opens only when the labels
claimed for it are empty, so an old key counts as unlabelled (the strict choice: a host
cannot label an old key into a more permissive rule).

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
BLOB_VERSION: Final = 2
"""The version new blobs are sealed in: the first that binds the key's labels."""
UNLABELLED_BLOB_VERSION: Final = 1
"""Blobs sealed before labels were bound; they open only for keys claimed unlabelled."""
BLOB_VERSIONS: Final = frozenset({UNLABELLED_BLOB_VERSION, BLOB_VERSION})
ALGORITHM: Final = "AES-256-GCM"
NONCE_SIZE: Final = 12
PRIVATE_KEY_SIZE: Final = 32
_TAG_SIZE: Final = 16
MAX_SEALED_SIZE: Final = 4096
"""The longest encoding :meth:`SealedKey.from_bytes` accepts."""
_CORRUPT: Final = "sealed key blob failed its integrity check"


def associated_data(
    *,
    key_id: str,
    chain: str,
    address: str,
    labels: tuple[str, ...] = (),
    version: int = BLOB_VERSION,
) -> bytes:
    """What a sealed key is bound to; any difference makes decryption fail.

    ``labels`` must be canonical (:func:`~signd.enclave.protocol.canonical_labels`). A
    version-1 blob binds no labels, so labels claimed for one are an IntegrityError.
    """
    if version == UNLABELLED_BLOB_VERSION:
        if labels:
            raise IntegrityError(_CORRUPT)
        return cbor2.dumps(
            [BLOB_FORMAT, version, ALGORITHM, key_id, chain, address], canonical=True
        )
    return cbor2.dumps(
        [BLOB_FORMAT, version, ALGORITHM, key_id, chain, address, list(labels)], canonical=True
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
        """The canonical CBOR map (RFC 7049 canonical: keys shorter first, then bytewise).

        The keys are written in that order and every value is canonical as encoded, so plain
        encoding gives the canonical bytes without paying for a sort on every key of a batch.
        """
        return cbor2.dumps(
            {
                "nonce": self.nonce,
                "format": BLOB_FORMAT,
                "version": self.version,
                "algorithm": self.algorithm,
                "kms_key_id": self.kms_key_id,
                "encrypted_data_key": self.encrypted_data_key,
                "encrypted_private_key": self.encrypted_private_key,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedKey:
        """Parse a blob; anything but exactly one well-formed map of a known version is an
        IntegrityError."""
        corrupt = IntegrityError(_CORRUPT)
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
            version not in BLOB_VERSIONS
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
    labels: tuple[str, ...] = (),
) -> SealedKey:
    """Encrypt a 32-byte private key under ``data_key`` with a fresh random nonce.

    ``labels`` must be canonical (:func:`~signd.enclave.protocol.canonical_labels`).
    """
    return BatchSealer(data_key, kms_key_id, encrypted_data_key).seal(
        secret, key_id=key_id, chain=chain, address=address, labels=labels
    )


class BatchSealer:
    """Seals many private keys under one data key (a batch), each with its own random nonce.

    The cipher and the blob's shared fields are set up once for the batch; :meth:`seal` does
    what :func:`seal_private_key` does for one key.
    """

    def __init__(self, data_key: Secret, kms_key_id: str, encrypted_data_key: bytes) -> None:
        self._aead = AESGCM(data_key.reveal_bytes())
        self._kms_key_id = kms_key_id
        self._encrypted_data_key = encrypted_data_key

    def __repr__(self) -> str:
        return f"BatchSealer(kms_key_id={self._kms_key_id!r})"

    def seal(
        self, secret: bytes, *, key_id: str, chain: str, address: str, labels: tuple[str, ...]
    ) -> SealedKey:
        nonce = os.urandom(NONCE_SIZE)
        ad = associated_data(key_id=key_id, chain=chain, address=address, labels=labels)
        ciphertext = self._aead.encrypt(nonce, secret, ad)
        return SealedKey(self._kms_key_id, self._encrypted_data_key, nonce, ciphertext)


def unseal_private_key(
    sealed: SealedKey,
    data_key: Secret,
    *,
    key_id: str,
    chain: str,
    address: str,
    labels: tuple[str, ...] = (),
) -> bytes:
    """Decrypt a sealed private key claimed to have the canonical ``labels``.

    A wrong key, tampering, a swapped blob or labels other than the sealed ones (any labels
    for a version-1 blob) → IntegrityError.
    """
    key = data_key.reveal_bytes()
    if len(key) != DATA_KEY_SIZE:
        raise IntegrityError(_CORRUPT)
    ad = associated_data(
        key_id=key_id, chain=chain, address=address, labels=labels, version=sealed.version
    )
    try:
        return AESGCM(key).decrypt(sealed.nonce, sealed.encrypted_private_key, ad)
    except InvalidTag:
        raise IntegrityError(_CORRUPT) from None
