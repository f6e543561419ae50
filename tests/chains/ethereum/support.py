"""Small helpers shared by the Ethereum tests."""

from __future__ import annotations

import coincurve

from signd.chains.ethereum.address import address_from_public_key
from signd.chains.ethereum.transactions import SignedTransaction, UnsignedTransaction
from signd.crypto.secp256k1 import sign_digest_with


def unhex(value: str) -> bytes:
    """Bytes from hex with or without a 0x prefix."""
    return bytes.fromhex(value.removeprefix("0x"))


def private_key(value: str | bytes) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(unhex(value) if isinstance(value, str) else value)


def address_of(key: coincurve.PrivateKey) -> str:
    return address_from_public_key(key.public_key.format(compressed=True))


def sign(transaction: UnsignedTransaction, key: coincurve.PrivateKey) -> SignedTransaction:
    """Sign the way signd does: digest, libsecp256k1 (RFC 6979), assemble."""
    return transaction.assemble(sign_digest_with(key, transaction.signing_digest()))
