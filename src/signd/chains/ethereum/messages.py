"""EIP-191 personal messages and the 65-byte r‖s‖v signature form."""

from __future__ import annotations

from signd.chains.ethereum.address import address_from_public_key
from signd.crypto.hashing import keccak256
from signd.crypto.secp256k1 import RecoverableSignature, check_digest
from signd.errors import InvalidField, InvalidSignature

PERSONAL_MESSAGE_PREFIX = b"\x19Ethereum Signed Message:\n"


def personal_message_digest(message: bytes) -> bytes:
    """keccak256("\\x19Ethereum Signed Message:\\n" + decimal length + message)."""
    if not isinstance(message, bytes | bytearray):
        raise InvalidField("message must be bytes", field="message")
    return keccak256(PERSONAL_MESSAGE_PREFIX + str(len(message)).encode() + bytes(message))


def to_eth_signature(signature: RecoverableSignature) -> bytes:
    """The 65-byte r‖s‖v form with v = 27 + recovery id."""
    if signature.recovery_id > 1:
        raise InvalidSignature("Ethereum signatures need a recovery id of 0 or 1")
    return (
        signature.r.to_bytes(32, "big")
        + signature.s.to_bytes(32, "big")
        + bytes([27 + signature.recovery_id])
    )


def recover_message_signer(digest: bytes, signature65: bytes) -> str:
    """The checksummed address that signed ``digest`` (v may be 0, 1, 27 or 28; low-S only)."""
    if not isinstance(signature65, bytes | bytearray) or len(signature65) != 65:
        raise InvalidSignature("an Ethereum signature is 65 bytes r||s||v")
    v = signature65[64]
    if v in (27, 28):
        v -= 27
    if v not in (0, 1):
        raise InvalidSignature("signature v must be 0, 1, 27 or 28")
    signature = RecoverableSignature.from_bytes(bytes(signature65[:64]) + bytes([v]))
    return address_from_public_key(signature.recover_public_key(check_digest(digest)))
