"""The enclave application: create sealed keys and sign with them. Runs inside the enclave.

Plaintext private keys and data keys exist only here, in memory, and never leave: what goes
back to the host is public keys, addresses, blob names and signatures. The host, KMS and the
blob store are all outside the trust boundary, so every answer from them is checked:

- a data key from ``GenerateDataKey`` is trusted only after its ``encryptedDataKey`` has been
  unwrapped again by ``Decrypt`` and found equal: a host that forged the answer, and so knows
  the plaintext, is caught when it relays the ``Decrypt`` to KMS. In recipient mode
  (:class:`signd.kms.recipient.Recipient`) KMS answers only to the enclave's attested RSA key
  and an answer carrying a plaintext is refused; forging *both* answers is stopped only by an
  authenticated channel to KMS (TLS terminated in the enclave, as on Nitro), see docs/KMS.md;
- a blob opens only under associated data naming its key id, chain, address and labels
  (:mod:`signd.enclave.sealing`), and the unsealed key must derive the address asked for. So
  a key's labels, which policy rules select keys by, are proven by the enclave, not taken
  from the host's records (:meth:`EnclaveSigner.verified_key`).

A batch of keys is stored as ONE blob, ``enclave-batch-<uuid>``: the concatenated
:class:`~signd.enclave.sealing.SealedKey` encodings of its keys. Each key's reference names
its byte range, ``enclave-batch-<uuid>@<offset>+<length>`` (:class:`BlobRange`), and a
signature reads only that range. A reference without a range (``enclave-<key_id>``, how keys
were stored before) names a whole single-key blob and still works.

Keys of one batch unsealed in one call (a gate call, a SIGN_DIGESTS batch) share one KMS
Decrypt and one read of their span of the batch blob (:class:`Unsealing`, kept for the
call's length); each key still opens only under its own associated data.
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import coincurve

from signd.chains import address_deriver
from signd.crypto.secp256k1 import (
    CURVE_ORDER,
    RecoverableSignature,
    check_digest,
    sign_digest_with,
    sign_digests_with,
    signatures_or_errors,
)
from signd.crypto.secret import Secret
from signd.enclave.cache import UnsealedKeyCache
from signd.enclave.protocol import MAX_BATCH, CreatedKey, KeyReference, canonical_labels
from signd.enclave.references import BATCH_BLOB_PREFIX, BlobRange
from signd.enclave.sealing import (
    PRIVATE_KEY_SIZE,
    BatchSealer,
    SealedKey,
    unseal_private_key,
)
from signd.errors import (
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyExists,
    SigndError,
)
from signd.kms.base import DATA_KEY_SIZE, DataKey, KmsClient
from signd.storage.base import MAX_RANGE_LENGTH, BlobStore

logger = logging.getLogger(__name__)

AddressFunction = Callable[[bytes], str]
"""A chain's address of a compressed SEC1 public key."""

ENCRYPTION_CONTEXT: Final[Mapping[str, str]] = {
    "service": "signd",
    "purpose": "enclave-sealed-key",
}
"""The KMS encryption context of every data key that seals an enclave key."""

DEFAULT_GROUP_MAX_KEYS: Final = 64
DEFAULT_GROUP_MAX_WAIT: Final = 0.002


def _new_key() -> tuple[bytes, bytes]:
    """A private scalar from the OS CSPRNG (0 < k < n) and its compressed public key.

    One EC multiplication: ``coincurve.PrivateKey()`` does a second one, for an x-only public
    key (BIP 340) that nothing here uses.
    """
    while True:
        secret = os.urandom(PRIVATE_KEY_SIZE)
        if 0 < int.from_bytes(secret, "big") < CURVE_ORDER:
            public_key = coincurve.PublicKey.from_valid_secret(secret)
            return secret, public_key.format(compressed=True)


@dataclass(frozen=True, slots=True)
class _Request:
    """One caller's ``create_keys``: its keys are sealed in whatever batch it is written in."""

    chain: str
    count: int
    address_of: AddressFunction
    labels: tuple[str, ...]


@dataclass(eq=False)
class _Group:
    """Small create requests sealed under one data key and stored as one batch blob."""

    deadline: float
    requests: list[_Request] = field(default_factory=list)
    keys: int = 0
    created: list[list[CreatedKey]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def add(self, request: _Request) -> int:
        """Take ``request``; its position in the group."""
        self.requests.append(request)
        self.keys += request.count
        return len(self.requests) - 1


class Unsealing:
    """What one call (a gate call, a raw SIGN_DIGESTS) fetched to unseal its keys, kept for
    the call's length and dropped with it: data keys KMS unwrapped, by wrapped form, and the
    spans of batch blobs it read.

    A batch's keys are sealed under one data key and stored in one blob, so a call that
    unseals several of them (sweeping deposit addresses created together, or a hot batch
    whose keys reach ``cache_max_uses`` together) needs one KMS Decrypt and, for the keys
    :meth:`EnclaveSigner.unsealing` was told of, one read of their span of the blob, not one
    of each per key. Each key still opens only under its own associated data.

    A Decrypt that failed fails the call's other keys under the same wrapped key alike, and a
    store that is unavailable fails the span's other keys alike, without another wait; the
    next call asks again. Any other failure to read a span (a blob cut short, say) leaves each
    key to its own read, and its own error.
    """

    __slots__ = ("_lock", "_span_reads", "_spans", "_unwrapped")

    def __init__(self, spans: Mapping[str, tuple[int, int]] | None = None) -> None:
        self._spans: Mapping[str, tuple[int, int]] = spans or {}
        self._unwrapped: dict[bytes, Secret | SigndError] = {}
        self._span_reads: dict[str, bytes | SigndError | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Unsealing({len(self._unwrapped)} data keys unwrapped, "
            f"{len(self._span_reads)} of {len(self._spans)} spans read)"
        )

    def unwrap(self, wrapped: bytes, decrypt: Callable[[bytes], Secret]) -> Secret:
        """``wrapped``'s data key: unwrapped earlier in this call, or by ``decrypt`` now."""
        with self._lock:
            known = self._unwrapped.get(wrapped)
        if known is None:
            try:
                known = decrypt(wrapped)
            except SigndError as error:
                known = error
            with self._lock:
                known = self._unwrapped.setdefault(wrapped, known)
        if isinstance(known, SigndError):
            raise copy.copy(known) from known
        return known

    def read(self, where: BlobRange, read_range: Callable[[str, int, int], bytes]) -> bytes:
        """The bytes at ``where``: from its blob's span, read by ``read_range`` once in this
        call, or by ``read_range`` alone when no span holds them."""
        span = self._spans.get(where.name)
        if span is None or not (span[0] <= where.offset and where.offset + where.length <= span[1]):
            return read_range(where.name, where.offset, where.length)
        start, end = span
        with self._lock:
            read = where.name in self._span_reads
            known = self._span_reads.get(where.name)
        if not read:
            try:
                known = read_range(where.name, start, end - start)
            except DependencyUnavailable as error:
                known = error
            except SigndError:
                known = None  # each key reads its own range and meets its own error
            with self._lock:
                known = self._span_reads.setdefault(where.name, known)
        if known is None:
            return read_range(where.name, where.offset, where.length)
        if isinstance(known, SigndError):
            raise copy.copy(known) from known
        return known[where.offset - start : where.offset - start + where.length]


class ProvenKey:
    """A sealed key whose blob proved every claim of its reference, unsealed: it signs
    without another use of the unsealed-key cache (:meth:`EnclaveSigner.proven_key`). Lives
    only for the call it was proven for; its repr shows the reference only."""

    __slots__ = ("_private_key", "reference")

    def __init__(self, reference: KeyReference, private_key: coincurve.PrivateKey) -> None:
        self.reference = reference
        self._private_key = private_key

    def __repr__(self) -> str:
        return f"ProvenKey({self.reference.key_id})"

    def sign_digest(self, digest: bytes) -> RecoverableSignature:
        """Sign a 32-byte digest (RFC 6979 nonce, low-S; checked by :func:`sign_digest_with`)."""
        return sign_digest_with(self._private_key, digest)

    @staticmethod
    def sign_many(
        pairs: Sequence[tuple[ProvenKey, bytes]],
    ) -> list[RecoverableSignature | SigndError]:
        """:meth:`sign_digest` of each (key, digest) pair, in order, on every core
        (:func:`sign_digests_with`); one that fails gives its error in its place."""
        try:
            return list(sign_digests_with([(key._private_key, digest) for key, digest in pairs]))
        except SigndError:  # a digest that is not 32 bytes: let each say which
            return signatures_or_errors(pairs, ProvenKey.sign_digest)


@dataclass(slots=True)
class _SharedLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class _KeyLocks:
    """A lock per key, kept while someone holds or waits for it.

    Callers of the same key take turns; a caller of another key never waits, however long
    one unseal takes (a stalled blob read holds up only the callers of its own key).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[KeyReference, _SharedLock] = {}

    @contextlib.contextmanager
    def held(self, key: KeyReference) -> Iterator[None]:
        with self._guard:
            shared = self._locks.get(key)
            if shared is None:
                shared = self._locks[key] = _SharedLock()
            shared.users += 1
        try:
            with shared.lock:
                yield
        finally:
            with self._guard:
                shared.users -= 1
                if shared.users == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        """How many keys have a lock now (held or waited for)."""
        with self._guard:
            return len(self._locks)


HEALTH_WITHIN: Final = 3.0
"""Seconds the enclave's health check waits for KMS and the blob store: below the host's wait
for one readiness check (``[api] health_timeout``, 5 s), so that ``/readyz`` names the part
that hangs instead of saying only that the enclave did not answer."""


def _probe_in_thread(
    name: str, probe: Callable[[], None]
) -> tuple[threading.Event, list[BaseException]]:
    """Start ``probe`` in a daemon thread: an event set when it ends, and its error if any."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            probe()
        except BaseException as exc:  # handed to the waiting caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"signd-health-{name}", daemon=True).start()
    return done, failure


class EnclaveSigner:
    """Creates secp256k1 keys sealed under KMS data keys, and signs 32-byte digests with them.

    ``cache`` holds unsealed keys between signatures (see :mod:`signd.enclave.cache`);
    ``address_deriver`` gives a chain's address derivation by chain name (an unknown chain
    raises); by default that of :mod:`signd.chains`.

    **One durable write per batch.** A batch's keys are sealed one by one (each under its own
    nonce, bound to its own key id, chain and address) and stored together in one batch blob
    with one ``put``: one fsync, or one S3 PUT, instead of one per key. The trade: a batch's
    keys share one stored object as well as one data key, so deleting or corrupting that
    object loses or breaks the whole batch (never silently: a key that does not open is an
    IntegrityError, a missing blob KeyNotFound).

    **Group commit.** Requests for at most ``group_max_keys`` keys (one deposit address
    each, say) that arrive while a batch is being written wait, at most ``group_max_wait``
    seconds, to be written together: one data key and one blob for the whole group, each
    caller getting only its own keys. A group holds at most ``group_max_keys`` keys; a
    request that finds nothing being written is written at once. If the group's write
    fails, every caller in it gets the error and none of its keys exists.
    """

    def __init__(
        self,
        kms: KmsClient,
        blobs: BlobStore,
        *,
        cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] | None = None,
        address_deriver: Callable[[str], AddressFunction] = address_deriver,
        max_batch: int = MAX_BATCH,
        group_max_keys: int = DEFAULT_GROUP_MAX_KEYS,
        group_max_wait: float = DEFAULT_GROUP_MAX_WAIT,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise InvalidField(f"max_batch must be 1..{MAX_BATCH}", field="max_batch")
        if not 1 <= group_max_keys <= max_batch:
            raise InvalidField(f"group_max_keys must be 1..{max_batch}", field="group_max_keys")
        if not 0 <= group_max_wait <= 10:
            raise InvalidField("group_max_wait must be 0..10 s", field="group_max_wait")
        self._kms = kms
        self._blobs = blobs
        self._cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] = (
            cache if cache is not None else UnsealedKeyCache()
        )
        self._address_deriver = address_deriver
        self.max_batch = max_batch
        self._group_max_keys = group_max_keys
        self._group_max_wait = group_max_wait
        self._groups = threading.Condition()
        self._sealing = threading.Lock()
        self._open_group: _Group | None = None
        self._writes_in_flight = 0
        self._unsealing = _KeyLocks()
        """Held while a key is unsealed, so that callers missing the cache for the same key
        wait for one unseal instead of each calling KMS."""

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

    def create_keys(
        self, chain: str, count: int = 1, labels: Sequence[str] = ()
    ) -> list[CreatedKey]:
        """Create, seal and durably store ``count`` keys; return their public facts.

        Each key's blob binds ``labels`` (canonical: checked, de-duplicated, sorted), so the
        key signs only for a reference that claims exactly those labels.

        One data key seals the whole batch, each key under its own random nonce. That costs two
        KMS calls per batch instead of two per key, which is what makes creating millions of
        deposit addresses affordable; the price is that whoever unwraps that one data key opens
        every key in the batch (not just one), so batches are capped at ``max_batch`` keys, far
        below the 2**32 messages AES-GCM allows under one key with random 96-bit nonces. A
        small request may share its batch, so its data key, with other callers' small requests
        (group commit, see the class docstring); a group holds at most ``group_max_keys``.

        Nothing is returned until the batch blob is stored. If the write fails, the blob is
        deleted (best effort) and the error is raised; a blob left behind is unusable, since the
        host never learns its keys and records nothing for them.
        """
        address_of = self._address_deriver(chain)
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 1 <= count <= self.max_batch
        ):
            raise InvalidField(f"count must be 1..{self.max_batch}", field="count")
        request = _Request(chain, count, address_of, canonical_labels(labels))
        if count > self._group_max_keys:
            return self._write_batch([request], alone=True)[0]
        return self._create_in_group(request)

    def _create_in_group(self, request: _Request) -> list[CreatedKey]:
        """Have ``request`` written with whatever small requests arrive while a write runs."""
        with self._groups:
            group, position, leader = self._join(request)
            if leader:
                while self._open_group is group and self._writes_in_flight > 0:
                    remaining = group.deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._groups.wait(remaining)
                if self._open_group is group:
                    self._open_group = None
                self._writes_in_flight += 1
        if leader:
            try:
                group.created = self._write_batch(group.requests)
            except BaseException as error:
                group.error = error
                raise
            finally:
                with self._groups:
                    self._writes_in_flight -= 1
                    self._groups.notify_all()
                group.done.set()
        else:
            group.done.wait()
            if group.error is not None:
                raise copy.copy(group.error) from group.error
        return group.created[position]

    def _join(self, request: _Request) -> tuple[_Group, int, bool]:
        """The group ``request`` is in, its position, and whether this caller writes the group.

        Call with ``_groups`` held. A request joins the open group if it fits; else it starts a
        group, left open for others only while some write is in flight.
        """
        group = self._open_group
        if group is not None and group.keys + request.count <= self._group_max_keys:
            position = group.add(request)
            if group.keys == self._group_max_keys:
                self._open_group = None
                self._groups.notify_all()
            return group, position, False
        if group is not None:
            self._open_group = None
            self._groups.notify_all()
        group = _Group(time.monotonic() + self._group_max_wait)
        position = group.add(request)
        if self._writes_in_flight > 0 and group.keys < self._group_max_keys:
            self._open_group = group
        return group, position, True

    def _write_batch(
        self, requests: list[_Request], *, alone: bool = False
    ) -> list[list[CreatedKey]]:
        """Seal every requested key under one data key and store them as one batch blob.

        A batch written ``alone`` (one big request) is sealed while no other such batch is:
        the enclave has one interpreter lock, so a second big batch sealed at once would only
        slow the first, and waiting instead lets it start the moment the first is sealed
        (while the first is stored and answered).
        """
        data_key = self._trusted_data_key()
        name = f"{BATCH_BLOB_PREFIX}{uuid.uuid4().hex}"
        with self._sealing if alone else contextlib.nullcontext():
            sealed_keys, created = self._seal(requests, data_key, name)
        try:
            self._blobs.put(name, b"".join(sealed_keys))
        except KeyExists:
            raise  # not this batch's blob: leave it alone
        except BaseException:
            self._delete_blob(name)
            raise
        return created

    @staticmethod
    def _seal(
        requests: list[_Request], data_key: DataKey, name: str
    ) -> tuple[list[bytes], list[list[CreatedKey]]]:
        """New keys for ``requests``, sealed under ``data_key``, laid out in the blob ``name``."""
        sealer = BatchSealer(data_key.plaintext, data_key.kms_key_id, data_key.ciphertext)
        sealed_keys: list[bytes] = []
        offset = 0
        created: list[list[CreatedKey]] = []
        for request in requests:
            chain, labels = request.chain, request.labels
            keys: list[CreatedKey] = []
            for _ in range(request.count):
                key_id = uuid.uuid4().hex
                secret, public_key = _new_key()
                address = request.address_of(public_key)
                sealed = sealer.seal(
                    secret, key_id=key_id, chain=chain, address=address, labels=labels
                ).to_bytes()
                where = str(BlobRange(name, offset, len(sealed)))
                keys.append(CreatedKey(key_id, chain, address, public_key, where, labels))
                sealed_keys.append(sealed)
                offset += len(sealed)
            created.append(keys)
        return sealed_keys, created

    def _delete_blob(self, name: str) -> None:
        try:
            self._blobs.delete(name)
        except SigndError as error:
            logger.warning("could not remove blob %s of a failed batch: %s", name, error.code)

    def _read_sealed(self, reference: str, unsealing: Unsealing | None = None) -> bytes:
        """A key's sealed bytes: its range of a batch blob, or a whole single-key blob."""
        where = BlobRange.parse(reference)
        if where is None:
            return self._blobs.get(reference)
        if unsealing is not None:
            return unsealing.read(where, self._blobs.get_range)
        return self._blobs.get_range(where.name, where.offset, where.length)

    def unsealing(self, keys: Iterable[KeyReference] = ()) -> Unsealing:
        """A call's :class:`Unsealing`, told which ``keys`` the call may sign with: where two
        or more of them lie in one batch blob and are not unsealed in memory, it reads the
        span that holds them once (at most :data:`~signd.storage.base.MAX_RANGE_LENGTH`
        bytes; a wider span is read key by key)."""
        named = list(keys)
        cold = [key for key in named if not self._cache.holds(key)] if len(named) > 1 else []
        if len(cold) < 2:
            return Unsealing()  # no span to share (a single request's key, a warm batch)
        bounds: dict[str, tuple[int, int, int]] = {}  # blob: start, end, keys
        for key in cold:
            try:
                where = BlobRange.parse(key.blob)
            except SigndError:
                continue  # its own unseal says what is wrong with it
            if where is None:
                continue
            end = where.offset + where.length
            start, last, count = bounds.get(where.name, (where.offset, end, 0))
            bounds[where.name] = (min(start, where.offset), max(last, end), count + 1)
        return Unsealing(
            {
                name: (start, end)
                for name, (start, end, count) in bounds.items()
                if count >= 2 and end - start <= MAX_RANGE_LENGTH
            }
        )

    def sign_digest(
        self, key: KeyReference, digest: bytes, unsealing: Unsealing | None = None
    ) -> RecoverableSignature:
        """Sign a 32-byte digest with a sealed key (RFC 6979 nonce, low-S).

        Signs only if ``key`` is what the blob binds, labels included (else IntegrityError).
        ``unsealing``: the call's (:meth:`unsealing`), if it may unseal other keys of a batch.
        """
        digest = check_digest(digest)
        return sign_digest_with(self._private_key(key, unsealing), digest)

    def holds_unsealed(self, key: KeyReference, uses: int = 1) -> bool:
        """Whether ``key`` is unsealed in memory for ``uses`` more uses (no I/O to use it)."""
        return self._cache.holds(key, uses)

    def verified_key(self, key: KeyReference) -> KeyReference:
        """``key``, once its sealed blob has proven every claim in it, labels included.

        What the host says about a key is not trusted; a reference this returns is: its key
        opens under associated data naming exactly its key id, chain, address and labels, and
        derives its address. Wrong claims raise IntegrityError. The proof is the unseal, so
        this uses (and counts one use of) the unsealed-key cache as a signature does.
        """
        self._private_key(key)
        return key

    def proven_key(self, key: KeyReference, unsealing: Unsealing | None = None) -> ProvenKey:
        """:meth:`verified_key`, kept unsealed to sign with: the proof and the signature that
        follows it use the cache once between them. ``unsealing`` as for :meth:`sign_digest`."""
        return ProvenKey(key, self._private_key(key, unsealing))

    def _private_key(
        self, key: KeyReference, unsealing: Unsealing | None = None
    ) -> coincurve.PrivateKey:
        """The unsealed key ``key`` names: cached (the cache is keyed on the whole reference,
        labels included, and holds only keys unsealed under it), or unsealed now."""
        private_key = self._cache.get(key)
        if private_key is not None:  # (so its chain is known: it was unsealed for it)
            return private_key
        address_of = self._address_deriver(key.chain)
        with self._unsealing.held(key):
            private_key = self._cache.get(key)  # unsealed by another caller meanwhile?
            if private_key is None:
                private_key = self._unseal(key, address_of, unsealing)
                self._cache.put(key, private_key)
        return private_key

    def _unseal(
        self, key: KeyReference, address_of: AddressFunction, unsealing: Unsealing | None
    ) -> coincurve.PrivateKey:
        sealed = SealedKey.from_bytes(self._read_sealed(key.blob, unsealing))
        if unsealing is None:
            data_key = self._decrypt(sealed.encrypted_data_key)
        else:
            data_key = unsealing.unwrap(sealed.encrypted_data_key, self._decrypt)
        secret = unseal_private_key(
            sealed,
            data_key,
            key_id=key.key_id,
            chain=key.chain,
            address=key.address,
            labels=key.labels,
        )
        try:
            private_key = coincurve.PrivateKey(secret)
        except ValueError:
            raise IntegrityError("sealed key blob failed its integrity check") from None
        if address_of(private_key.public_key.format(compressed=True)) != key.address:
            raise IntegrityError("sealed key blob failed its integrity check")
        return private_key

    def _decrypt(self, wrapped: bytes) -> Secret:
        return self._kms.decrypt(wrapped, encryption_context=ENCRYPTION_CONTEXT)

    def flush_cache(self) -> int:
        """Forget every unsealed key; the number forgotten."""
        return self._cache.flush()

    def check_health(self, within: float = HEALTH_WITHIN) -> None:
        """Raise DependencyUnavailable when KMS or the blob store cannot be reached, or does
        not answer ``within`` seconds. Both are probed at once, each in a thread of its own
        (a probe that is stuck ends at its client's own timeout), so that a part that hangs
        rather than refuses is named here, before the caller's wait for the enclave ends."""
        probes = {"KMS": self._kms.check_health, "the blob store": self._blobs.check_health}
        deadline = time.monotonic() + within
        outcomes = {name: _probe_in_thread(name, probe) for name, probe in probes.items()}
        for name, (done, failure) in outcomes.items():
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise DependencyUnavailable(
                    f"{name} did not answer the health check within {within:g} s"
                )
            if failure:
                raise failure[0]
