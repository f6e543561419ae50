"""The signing use cases shared by the CLI and the API."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from signd.chains import address_deriver
from signd.chains.ethereum.address import canonical_address
from signd.chains.ethereum.messages import personal_message_digest, to_eth_signature
from signd.chains.ethereum.transactions import SignedTransaction, parse_transaction
from signd.chains.ethereum.typed_data import typed_data_digest
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import CustodyBackend, KeyInfo, KeyPage
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    DependencyUnavailable,
    InvalidField,
    KeyNotFound,
    SigndError,
    shown,
)
from signd.gate.operations import MessageSignature as MessageSignature

_ETH_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")
MAX_BATCH = 100_000
KNOWN_KEYS = 65_536
"""Key records remembered by reference (key id, or address as given): a key's record never
changes once made and keys are never deleted, so a remembered one never goes stale."""

BackendFactory = Callable[[], CustodyBackend]


def signature_to_dict(signature: RecoverableSignature) -> dict[str, Any]:
    """The chain-neutral JSON shape of a digest signature."""
    return {
        "signature": "0x" + signature.to_bytes().hex(),
        "r": hex(signature.r),
        "s": hex(signature.s),
        "recovery_id": signature.recovery_id,
    }


def signature_json(signature: RecoverableSignature) -> str:
    """:func:`signature_to_dict` as compact JSON text, written out directly."""
    return (
        f'{{"signature":"0x{signature.to_bytes().hex()}","r":"{hex(signature.r)}",'
        f'"s":"{hex(signature.s)}","recovery_id":{signature.recovery_id}}}'
    )


class Signer:
    """Creates keys in the chosen custody and signs on behalf of any configured custody.

    Backends are opened lazily, on first use, so that signing with one custody never needs
    another's secrets (an HSM key does not need the keystore passphrase).
    """

    def __init__(self, factories: Mapping[str, BackendFactory]) -> None:
        self._factories = dict(factories)
        self._open: dict[str, CustodyBackend] = {}
        self._opening = threading.Lock()
        self._known: dict[str, KeyInfo] = {}
        self._knowing = threading.Lock()

    @property
    def custody_types(self) -> list[str]:
        return list(self._factories)

    def disable(self, custody: str) -> None:
        """Stop offering a custody type that has not been opened (e.g. a keystore without a
        passphrase in a service started with the embedded defaults)."""
        with self._opening:
            if custody in self._open:
                raise ConfigurationError(f"custody {custody!r} is open; it cannot be disabled")
            self._factories.pop(custody, None)

    def backend(self, custody: str) -> CustodyBackend:
        """The open backend for a custody type."""
        if custody not in self._factories:
            known = ", ".join(sorted(self._factories)) or "none"
            raise InvalidField(
                f"unknown or unconfigured custody {custody!r} (configured: {known})",
                field="custody",
            )
        backend = self._open.get(custody)
        if backend is None:
            with self._opening:
                backend = self._open.get(custody)
                if backend is None:
                    backend = self._open[custody] = self._factories[custody]()
        return backend

    def close(self) -> None:
        with self._opening:
            backends, self._open = list(self._open.values()), {}
        for backend in backends:
            backend.close()

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # keys

    def create_keys(
        self,
        *,
        chain: str,
        custody: str,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_BATCH:
            raise InvalidField(f"count must be an integer from 1 to {MAX_BATCH}", field="count")
        address_of = address_deriver(chain)
        return self.backend(custody).create_keys(chain, address_of, count, labels, progress)

    def resolve(self, ref: str | KeyInfo) -> tuple[CustodyBackend, KeyInfo]:
        """Find a key by key id or address in every configured custody.

        A custody that cannot be opened or reached does not hide keys held by the others; if
        the key is found nowhere, that custody's error is raised rather than "not found",
        since the key may be there.
        """
        if isinstance(ref, KeyInfo):
            return self.backend(ref.custody), ref
        if not isinstance(ref, str) or not ref:
            raise InvalidField("key must be a key id or an address", field="key")
        known = self._known.get(ref)
        if known is not None:
            return self.backend(known.custody), known
        lookup = canonical_address(ref) if _ETH_ADDRESS.fullmatch(ref) else ref
        failure: SigndError | None = None
        for custody in self._factories:
            try:
                backend = self.backend(custody)
                info = backend.find_key(lookup)
            except (ConfigurationError, DependencyUnavailable, AccessDenied) as exc:
                failure = failure or exc
                continue
            if info is not None:
                self._remember(ref, info)
                return backend, info
        if failure is not None:
            raise failure
        raise KeyNotFound(f"no key {shown(ref)}")

    def _remember(self, ref: str, info: KeyInfo) -> None:
        with self._knowing:
            self._known[ref] = info
            while len(self._known) > KNOWN_KEYS:
                del self._known[next(iter(self._known))]

    def key_is_known(self, ref: str) -> bool:
        """True when finding ``ref`` needs no lookup (its record is remembered)."""
        return ref in self._known

    def key_is_local(self, ref: str) -> bool:
        """True when signing with ``ref`` needs no I/O: its record is remembered and its
        custody signs in this process with a key already in memory."""
        info = self._known.get(ref)
        backend = self._open.get(info.custody) if info is not None else None
        return info is not None and backend is not None and backend.signs_locally(info)

    def get_key(self, ref: str | KeyInfo) -> KeyInfo:
        return self.resolve(ref)[1]

    def list_keys(
        self,
        *,
        custody: str,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        return self.backend(custody).list_keys(chain=chain, label=label, cursor=cursor, limit=limit)

    # signing

    def sign_hash(self, ref: str | KeyInfo, digest: bytes) -> RecoverableSignature:
        """Blind signing of a 32-byte digest (raw-hash signing: policy gates it in the service)."""
        backend, info = self.resolve(ref)
        return backend.sign_digest(info, digest)

    def sign_hashes(
        self, pairs: Sequence[tuple[KeyInfo, bytes]]
    ) -> list[RecoverableSignature | SigndError]:
        """:meth:`sign_hash` of each (key, digest) pair, in order, each custody's share at
        once (:meth:`CustodyBackend.sign_many`); one that fails gives its error in its
        place."""
        by_custody: dict[str, list[int]] = {}
        for index, (info, _) in enumerate(pairs):
            by_custody.setdefault(info.custody, []).append(index)
        signatures: dict[int, RecoverableSignature | SigndError] = {}
        for custody, indices in by_custody.items():
            try:
                signed = self.backend(custody).sign_many([pairs[i] for i in indices])
            except SigndError as exc:
                signed = [exc for _ in indices]
            signatures.update(zip(indices, signed, strict=True))
        return [signatures[index] for index in range(len(pairs))]

    def _ethereum_key(self, ref: str | KeyInfo) -> tuple[CustodyBackend, KeyInfo]:
        backend, info = self.resolve(ref)
        if info.chain != "ethereum":
            raise InvalidField(f"key {info.key_id} is a {info.chain} key", field="key")
        return backend, info

    def sign_eth_transaction(
        self, ref: str | KeyInfo, transaction: Mapping[str, Any]
    ) -> SignedTransaction:
        """Validate, hash, sign and assemble an Ethereum transaction given as wallet JSON."""
        backend, info = self._ethereum_key(ref)
        unsigned = parse_transaction(transaction)
        signature = backend.sign_digest(info, unsigned.signing_digest())
        return unsigned.assemble(signature, signer=info.address)  # checked against the key

    def sign_eth_message(self, ref: str | KeyInfo, message: bytes) -> MessageSignature:
        """EIP-191 personal_sign."""
        backend, info = self._ethereum_key(ref)
        signature = backend.sign_digest(info, personal_message_digest(message))
        return MessageSignature(to_eth_signature(signature), signature)

    def sign_eth_typed_data(
        self, ref: str | KeyInfo, document: Mapping[str, Any]
    ) -> MessageSignature:
        """EIP-712 typed data, eth_signTypedData_v4 semantics."""
        backend, info = self._ethereum_key(ref)
        signature = backend.sign_digest(info, typed_data_digest(document))
        return MessageSignature(to_eth_signature(signature), signature)
