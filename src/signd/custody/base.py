"""The small interface every custody backend implements.

An HSM (key never leaves the device, raw r‖s out), a KMS (remote call, DER out), an enclave
(keys sealed in storage) and a local keystore all fit it: a backend creates keys, describes
them, and signs 32-byte digests. The public :meth:`CustodyBackend.sign_digest` does the shared
checks and normalisation; backends implement :meth:`CustodyBackend._sign_digest` only.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from signd.crypto.secp256k1 import (
    RecoverableSignature,
    check_digest,
    normalize_signature,
    signatures_or_errors,
)
from signd.errors import (
    IntegrityError,
    InvalidField,
    InvalidSignature,
    KeyNotFound,
    SigndError,
)

AddressDeriver = Callable[[bytes], str]
"""Turns a compressed SEC1 public key into the chain's address string (given by the caller)."""

MAX_LABELS = 16
MAX_LABEL_LENGTH = 64


def new_key_id() -> str:
    """A fresh, unguessable key id."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Validate caller-supplied labels: short printable strings, no duplicates."""
    if isinstance(labels, str):
        raise InvalidField("labels must be a list of strings", field="labels")
    if len(labels) > MAX_LABELS:
        raise InvalidField(f"at most {MAX_LABELS} labels", field="labels")
    for label in labels:
        if (
            not isinstance(label, str)
            or not 0 < len(label) <= MAX_LABEL_LENGTH
            or not label.isprintable()
            or label != label.strip()
        ):
            raise InvalidField(
                f"each label must be 1-{MAX_LABEL_LENGTH} printable characters", field="labels"
            )
    return tuple(dict.fromkeys(labels))


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What signd knows about a key, without any secret."""

    key_id: str
    chain: str
    address: str
    public_key: bytes
    """Compressed SEC1 public key (33 bytes)."""
    custody: str
    created_at: datetime
    labels: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict, compare=False)
    """Backend-specific public facts, e.g. an HD path or an HSM object label."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by the CLI and the API."""
        body: dict[str, Any] = {
            "key_id": self.key_id,
            "chain": self.chain,
            "address": self.address,
            "public_key": "0x" + self.public_key.hex(),
            "custody": self.custody,
            "created_at": self.created_at.isoformat(),
            "labels": list(self.labels),
        }
        if self.details:
            body["details"] = dict(self.details)
        return body


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of a key listing; pass ``next_cursor`` back to get the next one."""

    keys: list[KeyInfo]
    next_cursor: str | None


def device_signature(output: bytes, digest: bytes, key: KeyInfo) -> RecoverableSignature:
    """A device's signature (an HSM's, KMS's, the enclave's) over ``digest`` as a low-S
    recoverable signature for ``key``. Output that is malformed or made with another key is the
    custody's fault, not the caller's: :class:`~signd.errors.IntegrityError` (500), never the
    400 ``invalid_signature`` a caller's own bad signature gets."""
    try:
        return normalize_signature(output, digest, key.public_key)
    except InvalidSignature as exc:
        raise IntegrityError(
            f"the {key.custody} custody's signature for key {key.key_id} is unusable: {exc.message}"
        ) from None


class CustodyBackend(ABC):
    """Creates keys, describes them, and signs 32-byte digests with them."""

    custody_type: ClassVar[str]

    @abstractmethod
    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        """Create ``count`` new keys; the private keys never leave the backend.

        ``progress`` is called with the number of keys finished so far, for progress bars.
        """

    @abstractmethod
    def find_key(self, ref: str) -> KeyInfo | None:
        """The key with this key id or (exact, canonical) address, or ``None``."""

    @abstractmethod
    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        """Keys in creation order, filtered, one page at a time."""

    @abstractmethod
    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes | RecoverableSignature:
        """Sign with the backend's key.

        Return a :class:`RecoverableSignature` only when it comes from libsecp256k1 in this
        process (already low-S with a correct recovery id); return the device's raw output
        (DER, r‖s or r‖s‖recid) otherwise, and the caller normalises and checks it.
        """

    def get_key(self, ref: str) -> KeyInfo:
        """Like :meth:`find_key`, but a missing key is an error."""
        info = self.find_key(ref)
        if info is None:
            raise KeyNotFound(f"no {self.custody_type} key {ref!r}")
        return info

    def public_key(self, ref: str) -> bytes:
        """The compressed public key of a key."""
        return self.get_key(ref).public_key

    def sign_digest(self, key: KeyInfo | str, digest: bytes) -> RecoverableSignature:
        """Sign a 32-byte digest: low-S, recovery id checked against the key's public key."""
        digest = check_digest(digest)
        info = key if isinstance(key, KeyInfo) else self.get_key(key)
        if info.custody != self.custody_type:
            raise KeyNotFound(f"key {info.key_id} is not held by {self.custody_type} custody")
        result = self._sign_digest(info, digest)
        if isinstance(result, RecoverableSignature):
            return result
        return device_signature(result, digest, info)

    def sign_many(
        self, pairs: Sequence[tuple[KeyInfo, bytes]]
    ) -> list[RecoverableSignature | SigndError]:
        """:meth:`sign_digest` of each (key, digest) pair, in order; one that fails gives
        its error in its place. Backends that sign in memory do it on every core."""
        return signatures_or_errors(pairs, self.sign_digest)

    def signs_locally(self, key: KeyInfo) -> bool:
        """True when signing with ``key`` needs no I/O (its private key is in this process's
        memory), so a caller may sign on an event loop; False by default."""
        return False

    def check_health(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise :class:`signd.errors.DependencyUnavailable` when the backend cannot serve."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release sessions, connections and cached secrets."""

    def __enter__(self) -> CustodyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
