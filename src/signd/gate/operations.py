"""What the gate is asked to do, in terms free of any transport."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from signd.chains.ethereum import SignedTransaction
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import KeyInfo


@dataclass(frozen=True, slots=True)
class MessageSignature:
    """An Ethereum message signature: 65 bytes r‖s‖v with v in {27, 28}."""

    signature: bytes
    recoverable: RecoverableSignature

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": "0x" + self.signature.hex(),
            "v": self.signature[64],
            "r": hex(self.recoverable.r),
            "s": hex(self.recoverable.s),
        }


SigningResult = RecoverableSignature | SignedTransaction | MessageSignature


class SigningKind(enum.StrEnum):
    """What a signing request asks for; also the ``type`` of a batch item."""

    HASH = "hash"
    ETH_TRANSACTION = "ethereum/transaction"
    ETH_MESSAGE = "ethereum/message"
    ETH_TYPED_DATA = "ethereum/typed-data"


@dataclass(frozen=True, slots=True)
class SigningCall:
    """One signing request: what to sign (``payload``), with which key (id or address)."""

    kind: SigningKind
    key: str
    payload: Any
    """The digest or message bytes, or the transaction or typed-data object."""


@dataclass(frozen=True, slots=True)
class Signed:
    """A signature made, with the key that made it."""

    key: KeyInfo
    result: SigningResult


Runner = Callable[..., Awaitable[Any]]
"""Runs a blocking call in a thread pool: ``await run(function, *args)`` (the API's)."""
