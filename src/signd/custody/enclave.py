"""Custody held by the enclave, described by the metadata store, signed remotely.

The host holds no key material. ``create_keys`` has the enclave create keys, checks each
address against the caller's own derivation, and only then records them; signing sends the
key's reference and the digest to the enclave, and the answer is checked against the recorded
public key. Two custodies work this way:

- :class:`EnclaveBackend` (``enclave``): keys the enclave seals under KMS data keys; ``details``
  name the blob. Keys sealed but never recorded (a failed batch) are unreachable, so unusable.
  Each blob binds the key's labels, and a signing request claims the labels on record: the
  enclave signs only if they are the sealed ones, so relabelling a record gains nothing.
- :class:`EnclaveHsmBackend` (``hsm`` with ``[hsm] in_enclave = true``): keys on the HSM token
  the enclave logs in to; ``details`` hold the CKA_ID and CKA_LABEL exactly as
  :class:`~signd.custody.hsm.HsmBackend` records them, so the same records work either way.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Final

from signd.crypto.secp256k1 import (
    RecoverableSignature,
    check_digest,
    compress_public_key,
)
from signd.custody.base import (
    AddressDeriver,
    KeyInfo,
    check_labels,
    device_signature,
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
    canonical_labels,
)
from signd.errors import IntegrityError, InvalidField, KeyNotFound, SigndError
from signd.storage.base import MetadataStore

BLOB_DETAIL = "blob"
"""The ``details`` entry naming a key's sealed blob."""
SEALED_LABELS_DETAIL = "sealed_labels"
"""The ``details`` entry (``"true"``) of a labelled key whose blob binds its labels.

Keys sealed before blobs bound labels (blob version 1) lack it: the enclave treats them as
unlabelled and opens them only when no labels are claimed, so none are sent for them.
"""

CreatedBatch = tuple[list[tuple[CreatedKey | CreatedHsmKey, dict[str, str]]], SigndError | None]
"""Keys the enclave made, each with the ``details`` to record, and the error that cut it short."""
GROUP_MAX_KEYS: Final = 64
"""The most keys concurrent small requests are created together in (as the enclave groups)."""
GROUPS_AT_ONCE: Final = 2
"""Groups of one chain and labels under way at once: one's metadata commit overlaps the next
one's blob write in the enclave."""


@dataclass(frozen=True, slots=True)
class _Order:
    """One ``create_keys`` call: what every key the enclave makes for it is checked against."""

    chain: str
    address_of: AddressDeriver
    labels: tuple[str, ...]
    """As the caller gave them (and as they are recorded)."""
    sealed_labels: tuple[str, ...]
    """As each key's blob must bind them (canonical)."""


@dataclass(eq=False)
class _Group:
    """Small requests of one order, asked of the enclave as one and recorded together."""

    counts: list[int] = field(default_factory=list)
    keys: list[KeyInfo] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass(eq=False)
class _Line:
    """The groups of one order waiting their turn, and how many are being created."""

    groups: deque[_Group] = field(default_factory=deque)
    running: int = 0


class EnclaveBackend(MetadataBackedBackend):
    """Custody through an enclave reached by ``client``; key descriptions live in ``metadata``.

    ``batch_size`` keys are created per enclave round trip (at most what the enclave accepts)
    and recorded in one metadata transaction. The default is the protocol's maximum: the
    enclave seals a round trip's keys under one data key and stores them as one blob, so
    bigger batches mean fewer KMS calls, durable writes and transactions per key; a smaller
    ``batch_size`` buys a smaller blast radius per data key (see ``docs/ENCLAVE.md``).

    A request for several batches keeps :attr:`batches_ahead` more of them asked of the
    enclave while it checks and records one, so the enclave makes batch n+1 while the host
    checks batch n. A key is returned only once its batch is recorded; when a batch fails,
    the batches asked ahead of it are still sealed and stored but never recorded, so, like a
    failed batch's keys, unreachable.

    **Group commit.** Concurrent small requests (at most :data:`GROUP_MAX_KEYS` keys, one
    deposit address each, say) for the same chain and labels are created together: one
    enclave request, one data key, one blob, one metadata transaction for the group. At most
    :data:`GROUPS_AT_ONCE` groups of the same chain and labels are under way; requests that
    arrive meanwhile form the next group, and a request that finds room goes at once. Each
    caller gets only its own keys. If the group fails, every caller in it gets the error and
    none of its keys is recorded.
    """

    custody_type: ClassVar[str] = "enclave"
    batches_ahead: ClassVar[int] = 1
    """One is enough: the enclave seals one big batch at a time, so more would only wait."""
    creates_together: ClassVar[bool] = True

    def __init__(
        self, client: EnclaveClient, metadata: MetadataStore, *, batch_size: int = MAX_BATCH
    ) -> None:
        if batch_size < 1:
            raise InvalidField("batch_size must be at least 1", field="batch_size")
        self._client = client
        super().__init__(metadata)
        self._batch_size = batch_size
        self._lines: dict[_Order, _Line] = {}
        self._turns = threading.Condition()

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
        order = _Order(chain, address_of, labels, canonical_labels(labels))
        step = min(self._batch_size, self._client.max_batch)
        if self.creates_together and count <= min(step, GROUP_MAX_KEYS):
            keys = self._create_together(order, count, min(step, GROUP_MAX_KEYS))
            if progress is not None:
                progress(count)
            return keys
        sizes = [min(step, count - done) for done in range(0, count, step)]
        created: list[KeyInfo] = []
        if len(sizes) == 1 or self.batches_ahead == 0:
            for size in sizes:
                self._record(self._create_batch(order, size), order, created, progress)
            return created
        with ThreadPoolExecutor(self.batches_ahead, thread_name_prefix="signd-keygen") as pool:
            asked: deque[Future[CreatedBatch]] = deque()
            try:
                for size in sizes:
                    if len(asked) == self.batches_ahead:
                        batch = asked.popleft().result()
                        asked.append(pool.submit(self._create_batch, order, size))
                        self._record(batch, order, created, progress)
                    else:
                        asked.append(pool.submit(self._create_batch, order, size))
                while asked:
                    self._record(asked.popleft().result(), order, created, progress)
            finally:
                for future in asked:
                    future.cancel()
        return created

    def _create_together(self, order: _Order, count: int, limit: int) -> list[KeyInfo]:
        """Create ``count`` keys in the next group of ``order`` (see the class docstring)."""
        with self._turns:
            line = self._lines.setdefault(order, _Line())
            group = line.groups[-1] if line.groups else None
            if group is None or group.total + count > limit:
                group = _Group()
                line.groups.append(group)
            start = group.total
            group.counts.append(count)
            leader = start == 0
            if leader:
                while line.running >= GROUPS_AT_ONCE or line.groups[0] is not group:
                    self._turns.wait()
                line.groups.popleft()
                line.running += 1
        if not leader:
            group.done.wait()
            if group.error is not None:
                raise copy.copy(group.error) from group.error
            return group.keys[start : start + count]
        try:
            self._record(self._create_batch(order, group.total), order, group.keys, None)
        except BaseException as error:
            group.error = error
            raise
        finally:
            with self._turns:
                line.running -= 1
                if not line.groups and not line.running:
                    del self._lines[order]
                self._turns.notify_all()
            group.done.set()
        return group.keys[:count]

    def _record(
        self,
        batch: CreatedBatch,
        order: _Order,
        created: list[KeyInfo],
        progress: Callable[[int], None] | None,
    ) -> None:
        """Check and record one batch's keys and add them to ``created``; then raise the error
        that cut the batch short, if any."""
        made, error = batch
        now = utc_now()
        keys = [self._checked(key, details, order, now) for key, details in made]
        if keys:
            self._metadata.add([record_from_info(info) for info in keys])
            created.extend(keys)
            if progress is not None:
                progress(len(created))
        if error is not None:
            raise error

    def _create_batch(self, order: _Order, size: int) -> CreatedBatch:
        """Have the enclave make ``size`` keys whose blobs bind the labels ordered."""
        keys = self._client.create_keys(order.chain, size, order.sealed_labels)
        return _with_details(keys, order), None

    def _reference(self, key: KeyInfo) -> AnyKeyReference:
        """What the enclave needs to sign with ``key``, claiming the labels on record.

        A key whose record does not say its blob binds its labels was sealed before blobs did,
        and claims none (the enclave would refuse any for it).
        """
        blob = key.details.get(BLOB_DETAIL)
        if blob is None:
            raise KeyNotFound(f"enclave key {key.key_id} has no sealed blob on record")
        sealed = key.details.get(SEALED_LABELS_DETAIL) == "true"
        return KeyReference(key.key_id, key.chain, key.address, blob, key.labels if sealed else ())

    def _checked(
        self,
        key: CreatedKey | CreatedHsmKey,
        details: dict[str, str],
        order: _Order,
        created_at: datetime,
    ) -> KeyInfo:
        """The enclave's answer as a KeyInfo, once the host's own derivation agrees with it and
        (for a sealed key) its blob binds the labels ordered."""
        public_key = compress_public_key(key.public_key)
        if key.chain != order.chain or order.address_of(public_key) != key.address:
            raise IntegrityError(
                f"the enclave's address for key {key.key_id} does not match this chain's derivation"
            )
        if isinstance(key, CreatedKey) and key.labels != order.sealed_labels:
            raise IntegrityError(f"the enclave did not bind key {key.key_id} to the labels asked")
        return KeyInfo(
            key_id=key.key_id,
            chain=order.chain,
            address=key.address,
            public_key=public_key,
            custody=self.custody_type,
            created_at=created_at,
            labels=order.labels,
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
                signatures.append(device_signature(answer, digest, info))
        return signatures

    @property
    def client(self) -> EnclaveClient:
        """The enclave this custody talks to (its gate, too: :mod:`signd.enclave.gate`)."""
        return self._client

    def reference(self, key: KeyInfo) -> AnyKeyReference:
        """What the enclave needs to find ``key``, with the labels claimed for it."""
        return self._reference(key)

    def record_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        keys: Sequence[CreatedKey],
        labels: Sequence[str] = (),
    ) -> list[KeyInfo]:
        """Check and record keys the enclave made through its gate (a gated ``keys:create``),
        as :meth:`create_keys` records the keys it asks for."""
        labels = check_labels(labels)
        order = _Order(chain, address_of, labels, canonical_labels(labels))
        created: list[KeyInfo] = []
        self._record((_with_details(keys, order), None), order, created, None)
        return created

    def check_health(self) -> None:
        self._client.health(self.custody_type)
        super().check_health()

    def attestation(self, nonce: bytes) -> bytes:
        """A fresh, unverified attestation document of the enclave behind this custody."""
        return self._client.attestation(nonce)

    def close(self) -> None:
        self._client.close()


def _with_details(
    keys: Sequence[CreatedKey], order: _Order
) -> list[tuple[CreatedKey | CreatedHsmKey, dict[str, str]]]:
    """Sealed keys with the details their records keep: the blob, and whether it binds the
    labels ordered (a record without the flag is claimed unlabelled)."""
    labelled = {SEALED_LABELS_DETAIL: "true"} if order.sealed_labels else {}
    return [(key, {BLOB_DETAIL: key.blob, **labelled}) for key in keys]


class EnclaveHsmBackend(EnclaveBackend):
    """HSM custody run by the enclave (``[hsm] in_enclave = true``).

    To its callers it is the ``hsm`` custody, like :class:`~signd.custody.hsm.HsmBackend`: the
    same records, the same errors (a refused PIN and a vanished token are
    DependencyUnavailable), the same signatures. Only the enclave loads the PKCS#11 module and
    knows the PIN. Keys are made ``batch_size`` per round trip (each is a key generation on the
    HSM); when the token fails part-way, the keys it made are recorded before the error is
    raised.
    """

    custody_type: ClassVar[str] = "hsm"
    batches_ahead: ClassVar[int] = 0
    """Serial: keys a token made for batches asked ahead of a failure would be left on it."""
    creates_together: ClassVar[bool] = False
    """A token makes keys one by one and may fail part-way: each request keeps its own."""

    def __init__(
        self, client: EnclaveClient, metadata: MetadataStore, *, batch_size: int = 16
    ) -> None:
        super().__init__(client, metadata, batch_size=batch_size)

    def _create_batch(self, order: _Order, size: int) -> CreatedBatch:
        made, error = self._client.create_hsm_keys(order.chain, size)
        return [(key, dict(token_key_details(key.cka_id, key.label))) for key in made], error

    def _reference(self, key: KeyInfo) -> AnyKeyReference:
        return HsmKeyReference(key.key_id, cka_id_of(key))
