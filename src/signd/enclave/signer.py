"""The enclave application: create sealed keys and sign with them. Runs inside the enclave.

Plaintext private keys and data keys exist only here, in memory, and never leave: what goes
back to the host is public keys, addresses, blob names and signatures. The host, KMS and the
blob store are all outside the trust boundary, so every answer from them is checked:

- a data key from ``GenerateDataKey`` is trusted only after its ``encryptedDataKey`` has been
  unwrapped again by ``Decrypt`` and found equal (a host that forged the answer, and so knows
  the plaintext, is caught; once KMS answers ``Decrypt`` to the enclave's attested
  ``Recipient`` the host can no longer forge that half either);
- a blob opens only under associated data naming its key id, chain and address
  (:mod:`signd.enclave.sealing`), and the unsealed key must derive the address asked for.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Final

import coincurve

from signd.chains import address_deriver
from signd.crypto.secp256k1 import (
    RecoverableSignature,
    check_digest,
    generate_private_key,
    sign_digest_with,
)
from signd.enclave.cache import UnsealedKeyCache
from signd.enclave.protocol import MAX_BATCH, CreatedKey, KeyReference
from signd.enclave.sealing import SealedKey, seal_private_key, unseal_private_key
from signd.errors import IntegrityError, InvalidField, SigndError
from signd.kms.base import DATA_KEY_SIZE, DataKey, KmsClient
from signd.storage.base import BlobStore

logger = logging.getLogger(__name__)

AddressFunction = Callable[[bytes], str]
"""A chain's address of a compressed SEC1 public key."""

ENCRYPTION_CONTEXT: Final[Mapping[str, str]] = {
    "service": "signd",
    "purpose": "enclave-sealed-key",
}
"""The KMS encryption context of every data key that seals an enclave key."""

BLOB_PREFIX: Final = "enclave-"


def blob_name(key_id: str) -> str:
    """Where a key's sealed blob is stored."""
    return f"{BLOB_PREFIX}{key_id}"


class EnclaveSigner:
    """Creates secp256k1 keys sealed under KMS data keys, and signs 32-byte digests with them.

    ``cache`` holds unsealed keys between signatures (see :mod:`signd.enclave.cache`);
    ``address_deriver`` gives a chain's address derivation by chain name (an unknown chain
    raises); by default that of :mod:`signd.chains`.
    """

    def __init__(
        self,
        kms: KmsClient,
        blobs: BlobStore,
        *,
        cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] | None = None,
        address_deriver: Callable[[str], AddressFunction] = address_deriver,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise InvalidField(f"max_batch must be 1..{MAX_BATCH}", field="max_batch")
        self._kms = kms
        self._blobs = blobs
        self._cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] = (
            cache if cache is not None else UnsealedKeyCache()
        )
        self._address_deriver = address_deriver
        self.max_batch = max_batch

    def __repr__(self) -> str:
        return f"EnclaveSigner(kms={self._kms!r}, blobs={self._blobs!r}, cache={self._cache!r})"

    @property
    def cached_keys(self) -> int:
        return len(self._cache)

    def _trusted_data_key(self) -> DataKey:
        """A fresh data key whose wrapped form KMS has just unwrapped to the same plaintext."""
        data_key = self._kms.generate_data_key(encryption_context=ENCRYPTION_CONTEXT)
        unwrapped = self._kms.decrypt(data_key.ciphertext, encryption_context=ENCRYPTION_CONTEXT)
        plaintext = data_key.plaintext.reveal_bytes()
        if len(plaintext) != DATA_KEY_SIZE or not hmac.compare_digest(
            plaintext, unwrapped.reveal_bytes()
        ):
            logger.warning("refused a KMS data key that failed its round-trip check")
            raise IntegrityError("the KMS data key failed its round-trip check")
        return data_key

    def create_keys(self, chain: str, count: int = 1) -> list[CreatedKey]:
        """Create, seal and durably store ``count`` keys; return their public facts.

        One data key seals the whole batch, each key under its own random nonce. That costs two
        KMS calls per batch instead of two per key, which is what makes creating millions of
        deposit addresses affordable; the price is that whoever unwraps that one data key opens
        every key in the batch (not just one), so batches are capped at ``max_batch`` keys, far
        below the 2**32 messages AES-GCM allows under one key with random 96-bit nonces.

        Nothing is returned until every blob is stored. If a write fails, the blobs already
        written for this batch are deleted (best effort) and the error is raised; a blob left
        behind is unusable, since the host never learns its key and records nothing for it.
        """
        address_of = self._address_deriver(chain)
        if isinstance(count, bool) or not 1 <= count <= self.max_batch:
            raise InvalidField(f"count must be 1..{self.max_batch}", field="count")
        data_key = self._trusted_data_key()
        created: list[CreatedKey] = []
        try:
            for _ in range(count):
                created.append(self._create_one(chain, address_of, data_key))
        except BaseException:
            self._delete_blobs([key.blob for key in created])
            raise
        return created

    def _create_one(self, chain: str, address_of: AddressFunction, data_key: DataKey) -> CreatedKey:
        key_id = uuid.uuid4().hex
        private_key = generate_private_key()
        public_key = private_key.public_key.format(compressed=True)
        address = address_of(public_key)
        sealed = seal_private_key(
            private_key.secret,
            data_key.plaintext,
            kms_key_id=data_key.kms_key_id,
            encrypted_data_key=data_key.ciphertext,
            key_id=key_id,
            chain=chain,
            address=address,
        )
        name = blob_name(key_id)
        self._blobs.put(name, sealed.to_bytes())
        return CreatedKey(key_id, chain, address, public_key, name)

    def _delete_blobs(self, names: list[str]) -> None:
        for name in names:
            try:
                self._blobs.delete(name)
            except SigndError as error:
                logger.warning("could not remove blob %s of a failed batch: %s", name, error.code)

    def sign_digest(self, key: KeyReference, digest: bytes) -> RecoverableSignature:
        """Sign a 32-byte digest with a sealed key (RFC 6979 nonce, low-S)."""
        digest = check_digest(digest)
        address_of = self._address_deriver(key.chain)
        private_key = self._cache.get(key)
        if private_key is None:
            private_key = self._unseal(key, address_of)
            self._cache.put(key, private_key)
        return sign_digest_with(private_key, digest)

    def _unseal(self, key: KeyReference, address_of: AddressFunction) -> coincurve.PrivateKey:
        sealed = SealedKey.from_bytes(self._blobs.get(key.blob))
        data_key = self._kms.decrypt(
            sealed.encrypted_data_key, encryption_context=ENCRYPTION_CONTEXT
        )
        secret = unseal_private_key(
            sealed, data_key, key_id=key.key_id, chain=key.chain, address=key.address
        )
        try:
            private_key = coincurve.PrivateKey(secret)
        except ValueError:
            raise IntegrityError("sealed key blob failed its integrity check") from None
        if address_of(private_key.public_key.format(compressed=True)) != key.address:
            raise IntegrityError("sealed key blob failed its integrity check")
        return private_key

    def flush_cache(self) -> int:
        """Forget every unsealed key; the number forgotten."""
        return self._cache.flush()

    def check_health(self) -> None:
        """Raise DependencyUnavailable when KMS or the blob store cannot be reached."""
        self._kms.check_health()
        self._blobs.check_health()
