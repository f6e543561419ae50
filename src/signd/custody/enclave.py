"""Custody held by the enclave, described by the metadata store, signed remotely.

The host holds no key material. ``create_keys`` has the enclave create keys, checks each
address against the caller's own derivation, and only then records them; signing sends the
key's reference and the digest to the enclave, and the answer is checked against the recorded
public key. Two custodies work this way:

- :class:`EnclaveBackend` (``enclave``): keys the enclave seals under KMS data keys; ``details``
  name the blob. Keys sealed but never recorded (a failed batch) are unreachable, so unusable.
- :class:`EnclaveHsmBackend` (``hsm`` with ``[hsm] in_enclave = true``): keys on the HSM token
  the enclave logs in to; ``details`` hold the CKA_ID and CKA_LABEL exactly as
  :class:`~signd.custody.hsm.HsmBackend` records them, so the same records work either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from signd.crypto.secp256k1 import (
    RecoverableSignature,
    check_digest,
    compress_public_key,
    normalize_signature,
)
from signd.custody.base import (
    AddressDeriver,
    KeyInfo,
    check_labels,
    utc_now,
)
from signd.custody.hsm.records import cka_id_of, token_key_details
from signd.custody.metadata import (
    MetadataBackedBackend,
    record_from_info,
)
from signd.enclave.client import AnyKeyReference, EnclaveClient
from signd.enclave.protocol import (
    MAX_BATCH,
    CreatedHsmKey,
    CreatedKey,
    HsmKeyReference,
    KeyReference,
)
from signd.errors import IntegrityError, InvalidField, KeyNotFound, SigndError
from signd.storage.base import MetadataStore

BLOB_DETAIL = "blob"
"""The ``details`` entry naming a key's sealed blob."""

CreatedBatch = tuple[list[tuple[CreatedKey | CreatedHsmKey, dict[str, str]]], SigndError | None]
"""Keys the enclave made, each with the ``details`` to record, and the error that cut it short."""


class EnclaveBackend(MetadataBackedBackend):
    """Custody through an enclave reached by ``client``; key descriptions live in ``metadata``.

    ``batch_size`` keys are created per enclave round trip (at most what the enclave accepts)
    and recorded in one metadata transaction. The default is the protocol's maximum: the
    enclave seals a round trip's keys under one data key and stores them as one blob, so
    bigger batches mean fewer KMS calls, durable writes and transactions per key; a smaller
    ``batch_size`` buys a smaller blast radius per data key (see ``docs/ENCLAVE.md``).
    """

    custody_type: ClassVar[str] = "enclave"

    def __init__(
        self, client: EnclaveClient, metadata: MetadataStore, *, batch_size: int = MAX_BATCH
    ) -> None:
        if batch_size < 1:
            raise InvalidField("batch_size must be at least 1", field="batch_size")
        self._client = client
        super().__init__(metadata)
        self._batch_size = batch_size

    def __repr__(self) -> str:
        return f"EnclaveBackend({self._client!r})"

    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        labels = check_labels(labels)
        if not isinstance(chain, str) or not chain:
            raise InvalidField("chain must be a non-empty string", field="chain")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidField("count must be a positive integer", field="count")
        created: list[KeyInfo] = []
        while len(created) < count:
            size = min(count - len(created), self._batch_size, self._client.max_batch)
            made, error = self._create_batch(chain, size)
            batch = [
                self._checked(key, details, chain, address_of, labels) for key, details in made
            ]
            if batch:
                self._metadata.add([record_from_info(info) for info in batch])
                created.extend(batch)
                if progress is not None:
                    progress(len(created))
            if error is not None:
                raise error
        return created

    def _create_batch(self, chain: str, size: int) -> CreatedBatch:
        """Have the enclave make ``size`` keys."""
        return [
            (key, {BLOB_DETAIL: key.blob}) for key in self._client.create_keys(chain, size)
        ], None

    def _reference(self, key: KeyInfo) -> AnyKeyReference:
        """What the enclave needs to sign with ``key``."""
        blob = key.details.get(BLOB_DETAIL)
        if blob is None:
            raise KeyNotFound(f"enclave key {key.key_id} has no sealed blob on record")
        return KeyReference(key.key_id, key.chain, key.address, blob)

    def _checked(
        self,
        key: CreatedKey | CreatedHsmKey,
        details: dict[str, str],
        chain: str,
        address_of: AddressDeriver,
        labels: tuple[str, ...],
    ) -> KeyInfo:
        """The enclave's answer as a KeyInfo, once the host's own derivation agrees with it."""
        public_key = compress_public_key(key.public_key)
        if key.chain != chain or address_of(public_key) != key.address:
            raise IntegrityError(
                f"the enclave's address for key {key.key_id} does not match this chain's derivation"
            )
        return KeyInfo(
            key_id=key.key_id,
            chain=chain,
            address=key.address,
            public_key=public_key,
            custody=self.custody_type,
            created_at=utc_now(),
            labels=labels,
            details=details,
        )

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes:
        return self._client.sign_digest(self._reference(key), digest)

    def sign_digests(
        self, items: Sequence[tuple[KeyInfo | str, bytes]]
    ) -> list[RecoverableSignature]:
        """Sign many digests in as few enclave round trips as possible; any failure raises."""
        prepared: list[tuple[KeyInfo, bytes]] = []
        for key, digest in items:
            info = key if isinstance(key, KeyInfo) else self.get_key(key)
            if info.custody != self.custody_type:
                raise KeyNotFound(f"key {info.key_id} is not held by {self.custody_type} custody")
            prepared.append((info, check_digest(digest)))
        signatures: list[RecoverableSignature] = []
        step = self._client.max_batch
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            answers = self._client.sign_digests([(self._reference(k), d) for k, d in chunk])
            for (info, digest), answer in zip(chunk, answers, strict=True):
                if isinstance(answer, SigndError):
                    raise answer
                signatures.append(normalize_signature(answer, digest, info.public_key))
        return signatures

    def check_health(self) -> None:
        self._client.health(self.custody_type)

    def close(self) -> None:
        self._client.close()


class EnclaveHsmBackend(EnclaveBackend):
    """HSM custody run by the enclave (``[hsm] in_enclave = true``).

    To its callers it is the ``hsm`` custody, like :class:`~signd.custody.hsm.HsmBackend`: the
    same records, the same errors (a wrong PIN is AccessDenied, a vanished token
    DependencyUnavailable), the same signatures. Only the enclave loads the PKCS#11 module and
    knows the PIN. Keys are made ``batch_size`` per round trip (each is a key generation on the
    HSM); when the token fails part-way, the keys it made are recorded before the error is
    raised.
    """

    custody_type: ClassVar[str] = "hsm"

    def __init__(
        self, client: EnclaveClient, metadata: MetadataStore, *, batch_size: int = 16
    ) -> None:
        super().__init__(client, metadata, batch_size=batch_size)

    def _create_batch(self, chain: str, size: int) -> CreatedBatch:
        made, error = self._client.create_hsm_keys(chain, size)
        return [(key, dict(token_key_details(key.cka_id, key.label))) for key in made], error

    def _reference(self, key: KeyInfo) -> AnyKeyReference:
        return HsmKeyReference(key.key_id, cka_id_of(key))
