"""Small in-memory stand-ins for KMS, blob store and metadata store, with failure switches."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd.crypto.secret import Secret
from signd.enclave.protocol import CreatedKey
from signd.enclave.sealing import SealedKey, associated_data
from signd.enclave.signer import ENCRYPTION_CONTEXT
from signd.errors import DependencyUnavailable, IntegrityError, KeyExists, KeyNotFound
from signd.kms.base import DataKey, KmsClient
from signd.storage.base import (
    BlobStat,
    BlobStore,
    KeyRecord,
    KeystoreRecord,
    MetadataStore,
    RecordPage,
    updated_keystore_record,
)


def _context_bytes(context: Mapping[str, str] | None) -> bytes:
    return json.dumps(dict(context or {}), sort_keys=True).encode()


class MemoryKms(KmsClient):
    """Wraps data keys under an in-memory master key, bound to the encryption context."""

    kms_type = "memory"

    def __init__(self, master_key: bytes | None = None) -> None:
        self._aead = AESGCM(master_key or os.urandom(32))
        self.down = False
        self.generated = 0
        self.decrypted = 0
        self.contexts: list[dict[str, str]] = []
        self.issued: list[bytes] = []

    def _check_up(self) -> None:
        if self.down:
            raise DependencyUnavailable("memory KMS is down")

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        self._check_up()
        self.generated += 1
        self.contexts.append(dict(encryption_context or {}))
        plaintext = os.urandom(32)
        self.issued.append(plaintext)
        nonce = os.urandom(12)
        wrapped = nonce + self._aead.encrypt(nonce, plaintext, _context_bytes(encryption_context))
        return DataKey(Secret(plaintext), wrapped, "memory-key-1")

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        self._check_up()
        self.decrypted += 1
        try:
            return Secret(
                self._aead.decrypt(
                    ciphertext[:12], ciphertext[12:], _context_bytes(encryption_context)
                )
            )
        except (InvalidTag, ValueError):
            raise IntegrityError("data key ciphertext failed its integrity check") from None

    def check_health(self) -> None:
        self._check_up()


class ForgingKms(MemoryKms):
    """A host that forges GenerateDataKey: it hands over a plaintext it knows, next to a real
    ciphertext (of some other data key) or a made-up one."""

    def __init__(self, *, real_ciphertext: bool) -> None:
        super().__init__()
        self.real_ciphertext = real_ciphertext
        self.known_plaintext = b"\x42" * 32

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        if self.real_ciphertext:
            genuine = super().generate_data_key(encryption_context=encryption_context)
            return replace(genuine, plaintext=Secret(self.known_plaintext))
        return DataKey(Secret(self.known_plaintext), os.urandom(60), "memory-key-1")


class MemoryBlobStore(BlobStore):
    """Names → bytes in a dict; ``fail_puts_after`` makes the n+1-th put fail."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.written: dict[str, datetime] = {}
        self.quarantined: dict[str, bytes] = {}
        self.down = False
        self.fail_puts_after: int | None = None
        self.puts = 0
        self.gets = 0
        self._lock = threading.Lock()

    def _check_up(self) -> None:
        if self.down:
            raise DependencyUnavailable("memory blob store is down")

    def put(self, name: str, data: bytes) -> None:
        self._check_up()
        with self._lock:
            if self.fail_puts_after is not None and self.puts >= self.fail_puts_after:
                raise DependencyUnavailable("memory blob store failed a write")
            if name in self.blobs:
                raise KeyExists(f"blob {name!r} already exists")
            self.puts += 1
            self.blobs[name] = bytes(data)
            self.written[name] = datetime.now(UTC)

    def get(self, name: str) -> bytes:
        self._check_up()
        with self._lock:
            self.gets += 1
            try:
                return self.blobs[name]
            except KeyError:
                raise KeyNotFound(f"no blob {name!r}") from None

    def delete(self, name: str) -> None:
        self._check_up()
        with self._lock:
            self.blobs.pop(name, None)

    def stat(self, name: str) -> BlobStat | None:
        self._check_up()
        with self._lock:
            if name not in self.blobs:
                return None
            return BlobStat(name, len(self.blobs[name]), self.written.get(name, datetime.now(UTC)))

    def list_blobs(self, prefix: str = "") -> Iterator[BlobStat]:
        self._check_up()
        with self._lock:
            names = [name for name in self.blobs if name.startswith(prefix)]
        for name in names:
            found = self.stat(name)
            if found is not None:
                yield found

    def quarantine(self, name: str) -> str:
        self._check_up()
        with self._lock:
            if name not in self.blobs:
                raise KeyNotFound(f"no blob {name!r}")
            if self.quarantined.get(name, self.blobs[name]) != self.blobs[name]:
                raise KeyExists(f"the quarantine already holds another blob named {name!r}")
            self.quarantined[name] = self.blobs.pop(name)
        return f"memory:quarantine/{name}"

    def list_quarantined(self) -> Iterator[BlobStat]:
        self._check_up()
        with self._lock:
            held = [(name, len(data)) for name, data in self.quarantined.items()]
        for name, size in held:
            yield BlobStat(name, size, self.written.get(name, datetime.now(UTC)))

    def check_health(self) -> None:
        self._check_up()


class SlowBlobStore(MemoryBlobStore):
    """Reads of the blobs named in ``slow`` wait until ``release`` is set (at most 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: set[str] = set()
        self.release = threading.Event()

    def get(self, name: str) -> bytes:
        if name in self.slow:
            self.release.wait(timeout=10)
        return super().get(name)


class MemoryMetadataStore(MetadataStore):
    """Records in a list, in insertion order; the cursor is a plain index."""

    def __init__(self) -> None:
        self.records: list[KeyRecord] = []
        self.keystores: dict[str, KeystoreRecord] = {}
        self.down = False
        self._lock = threading.Lock()

    def add(self, records: Sequence[KeyRecord]) -> None:
        if self.down:
            raise DependencyUnavailable("memory metadata store is down")
        with self._lock:
            known = {r.key_id for r in self.records} | {r.address for r in self.records}
            for record in records:
                if record.key_id in known or record.address in known:
                    raise KeyExists(f"key {record.key_id} exists")
            self.records.extend(records)

    def find(self, ref: str, *, custody: str | None = None) -> KeyRecord | None:
        with self._lock:
            for record in self.records:
                if ref in (record.key_id, record.address) and custody in (None, record.custody):
                    return record
        return None

    def list(
        self,
        *,
        custody: str | None = None,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> RecordPage:
        with self._lock:
            matching = [
                r
                for r in self.records
                if custody in (None, r.custody)
                and chain in (None, r.chain)
                and (label is None or label in r.labels)
            ]
        start = int(cursor or 0)
        page = matching[start : start + limit]
        more = start + limit < len(matching)
        return RecordPage(page, str(start + limit) if more else None)

    def keystore_record(self, location: str) -> KeystoreRecord | None:
        if self.down:
            raise DependencyUnavailable("memory metadata store is down")
        return self.keystores.get(location)

    def record_keystore(self, seen: KeystoreRecord) -> KeystoreRecord:
        if self.down:
            raise DependencyUnavailable("memory metadata store is down")
        with self._lock:
            current = self.keystores.get(seen.location)
            updated = updated_keystore_record(current, seen)
            if updated is None:
                assert current is not None
                return current
            self.keystores[seen.location] = updated
            return updated


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unseal_in_test(kms: MemoryKms, blob: bytes, key: CreatedKey) -> bytes:
    """Open a blob the way only the enclave should, to check what was sealed."""
    sealed = SealedKey.from_bytes(blob)
    data_key = kms.decrypt(sealed.encrypted_data_key, encryption_context=ENCRYPTION_CONTEXT)
    ad = associated_data(
        key_id=key.key_id,
        chain=key.chain,
        address=key.address,
        labels=key.labels,
        version=sealed.version,
    )
    return AESGCM(data_key.reveal_bytes()).decrypt(sealed.nonce, sealed.encrypted_private_key, ad)
