"""Enclave custody: keys sealed by the enclave, described by the metadata store, signed remotely.

The host holds no key material. ``create_keys`` has the enclave create and seal keys, checks
each address against the caller's own derivation, and only then records them (blob name in
``details``); signing sends the key's blob reference and the digest to the enclave, and the
base class checks the answer against the recorded public key. Keys the enclave sealed but that
were never recorded (a failed batch) are unreachable, so never usable.
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
    CustodyBackend,
    KeyInfo,
    KeyPage,
    check_labels,
    utc_now,
)
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CreatedKey, KeyReference
from signd.errors import IntegrityError, InvalidField, KeyNotFound, SigndError
from signd.storage.base import KeyRecord, MetadataStore

BLOB_DETAIL = "blob"
"""The ``details`` entry naming a key's sealed blob."""


class EnclaveBackend(CustodyBackend):
    """Custody through an enclave reached by ``client``; key descriptions live in ``metadata``.

    ``batch_size`` keys are created per enclave round trip (at most what the enclave accepts)
    and recorded in one metadata transaction.
    """

    custody_type: ClassVar[str] = "enclave"

    def __init__(
        self, client: EnclaveClient, metadata: MetadataStore, *, batch_size: int = 100
    ) -> None:
        if batch_size < 1:
            raise InvalidField("batch_size must be at least 1", field="batch_size")
        self._client = client
        self._metadata = metadata
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
            batch = [
                self._checked(key, chain, address_of, labels)
                for key in self._client.create_keys(chain, size)
            ]
            self._metadata.add([_record(info) for info in batch])
            created.extend(batch)
            if progress is not None:
                progress(len(created))
        return created

    def _checked(
        self, key: CreatedKey, chain: str, address_of: AddressDeriver, labels: tuple[str, ...]
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
            details={BLOB_DETAIL: key.blob},
        )

    def find_key(self, ref: str) -> KeyInfo | None:
        record = self._metadata.find(ref, custody=self.custody_type)
        return None if record is None else _info(record)

    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        page = self._metadata.list(
            custody=self.custody_type, chain=chain, label=label, cursor=cursor, limit=limit
        )
        return KeyPage([_info(record) for record in page.records], page.next_cursor)

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes:
        return self._client.sign_digest(_reference(key), digest)

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
            answers = self._client.sign_digests([(_reference(k), d) for k, d in chunk])
            for (info, digest), answer in zip(chunk, answers, strict=True):
                if isinstance(answer, SigndError):
                    raise answer
                signatures.append(normalize_signature(answer, digest, info.public_key))
        return signatures

    def check_health(self) -> None:
        self._client.health()

    def close(self) -> None:
        self._client.close()


def _reference(key: KeyInfo) -> KeyReference:
    blob = key.details.get(BLOB_DETAIL)
    if blob is None:
        raise KeyNotFound(f"enclave key {key.key_id} has no sealed blob on record")
    return KeyReference(key.key_id, key.chain, key.address, blob)


def _record(info: KeyInfo) -> KeyRecord:
    return KeyRecord(
        key_id=info.key_id,
        chain=info.chain,
        address=info.address,
        public_key=info.public_key,
        custody=info.custody,
        created_at=info.created_at,
        labels=info.labels,
        details=tuple(sorted(info.details.items())),
    )


def _info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=record.key_id,
        chain=record.chain,
        address=record.address,
        public_key=record.public_key,
        custody=record.custody,
        created_at=record.created_at,
        labels=record.labels,
        details=dict(record.details),
    )
