"""From a request to what will be signed: the digest, the facts the policy judges, and how
the signature becomes the answer.

Everything the policy sees comes from decoding the request here (the transaction that will
be hashed, the typed data's domain), never from what a caller says it contains; the digest
signed is the one computed from that same decoded object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from signd.chains.ethereum.messages import personal_message_digest, to_eth_signature
from signd.chains.ethereum.transactions import SignedTransaction, parse_transaction
from signd.chains.ethereum.typed_data import parse_typed_data
from signd.crypto.secp256k1 import RecoverableSignature, check_digest
from signd.custody.base import KeyInfo
from signd.errors import InvalidField
from signd.gate.operations import MessageSignature, SigningKind, SigningResult
from signd.policy import Operation

SELECTOR_SIZE = 4


@dataclass(frozen=True, slots=True)
class Prepared:
    """A decoded request: the operation and facts for the policy, the digest to sign, and
    ``assemble`` to turn the signature over exactly that digest into the result."""

    operation: Operation
    digest: bytes
    assemble: Callable[[RecoverableSignature], SigningResult]
    facts: dict[str, Any] = field(default_factory=dict)
    """``SigningIntent`` keywords: chain_id, to, value, gas, fee_per_gas, has_data,
    data_selector, eip712_domain."""


def prepare(kind: SigningKind, payload: Any, key: KeyInfo) -> Prepared:
    """Decode ``payload`` for signing with ``key``; malformed input raises a 4xx error."""
    if kind is SigningKind.HASH:
        return Prepared(Operation.SIGN_HASH, check_digest(payload), hash_result)
    if key.chain != "ethereum":
        raise InvalidField(f"key {key.key_id} is a {key.chain} key", field="key")
    if kind is SigningKind.ETH_TRANSACTION:
        return _transaction(payload, key)
    if kind is SigningKind.ETH_MESSAGE:
        return Prepared(Operation.SIGN_MESSAGE, personal_message_digest(payload), _message)
    return _typed_data(payload)


def result_bytes(result: SigningResult) -> bytes:
    """What the caller receives, as bytes: for the audit record's ``result_sha256``."""
    if isinstance(result, SignedTransaction):
        return result.raw
    if isinstance(result, MessageSignature):
        return result.signature
    return result.to_bytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_result(signature: RecoverableSignature) -> SigningResult:
    """What a hash call answers: the signature itself."""
    return signature


def _message(signature: RecoverableSignature) -> SigningResult:
    return MessageSignature(to_eth_signature(signature), signature)


def _transaction(payload: Mapping[str, Any], key: KeyInfo) -> Prepared:
    unsigned = parse_transaction(payload)
    sender = unsigned.from_address
    if sender is not None and sender.lower() != key.address.lower():
        raise InvalidField(f"from {sender} is not the address of key {key.key_id}", field="from")
    data = unsigned.data
    facts = {
        "chain_id": unsigned.chain_id,
        "to": unsigned.to,
        "value": unsigned.value,
        "gas": unsigned.gas,
        "fee_per_gas": unsigned.fee_per_gas,  # the fee signed, with any host fills applied
        "has_data": bool(data),
        "data_selector": data[:SELECTOR_SIZE] if len(data) >= SELECTOR_SIZE else None,
    }
    signer = key.address  # signatures reach assemble checked against this key

    def assemble(signature: RecoverableSignature) -> SignedTransaction:
        return unsigned.assemble(signature, signer=signer)

    return Prepared(Operation.SIGN_TRANSACTION, unsigned.signing_digest(), assemble, facts)


def _typed_data(document: Mapping[str, Any]) -> Prepared:
    """The policy judges the domain as it is signed: its non-null fields, each standard one
    only in its EIP-712 type, the chainId as the integer the digest encodes."""
    typed = parse_typed_data(document)  # validates the whole document, domain included
    domain = typed.judged_domain()
    facts = {"chain_id": domain.get("chainId"), "eip712_domain": domain}
    return Prepared(Operation.SIGN_TYPED_DATA, typed.digest, _message, facts)
