"""secp256k1 through coincurve (libsecp256k1), and the one signature normaliser.

Every custody backend returns whatever its device gives (DER from KMS, raw r‖s from PKCS#11,
65-byte r‖s‖recid from a local key, possibly high-S). :func:`normalize_signature` turns any of
those into a :class:`RecoverableSignature`: low-S, with the recovery id checked against the
key's public key. Chain modules turn that into chain-specific forms (Ethereum's v, DER, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import coincurve
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signd.errors import InvalidField, InvalidSignature

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_CURVE_ORDER = CURVE_ORDER // 2
DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class RecoverableSignature:
    """A normalised ECDSA signature: 0 < r < n, 0 < s <= n/2, recovery id 0..3."""

    r: int
    s: int
    recovery_id: int

    def __post_init__(self) -> None:
        if not (0 < self.r < CURVE_ORDER and 0 < self.s <= HALF_CURVE_ORDER):
            raise InvalidSignature("signature r or s is out of range or high-S")
        if self.recovery_id not in (0, 1, 2, 3):
            raise InvalidSignature("recovery id must be 0, 1, 2 or 3")

    def to_bytes(self) -> bytes:
        """The 65-byte form r(32) ‖ s(32) ‖ recovery id."""
        return self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([self.recovery_id])

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoverableSignature:
        if len(data) != 65:
            raise InvalidSignature("a recoverable signature is 65 bytes")
        return cls(int.from_bytes(data[:32], "big"), int.from_bytes(data[32:64], "big"), data[64])

    def recover_public_key(self, digest: bytes) -> bytes:
        """The compressed public key that produced this signature over ``digest``."""
        return recover_public_key(digest, self.to_bytes())


def check_digest(digest: bytes) -> bytes:
    """Refuse anything that is not exactly a 32-byte digest."""
    if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST_SIZE:
        raise InvalidField("digest must be exactly 32 bytes", field="hash")
    return bytes(digest)


def generate_private_key() -> coincurve.PrivateKey:
    """A new private key from the OS CSPRNG (libsecp256k1 rejects out-of-range scalars)."""
    return coincurve.PrivateKey()


def public_key_of(secret: bytes) -> bytes:
    """The compressed public key of a 32-byte private scalar."""
    try:
        return coincurve.PrivateKey(secret).public_key.format(compressed=True)
    except ValueError:
        raise InvalidField("private key is not a valid secp256k1 scalar") from None


def compress_public_key(public_key: bytes) -> bytes:
    """Validate a SEC1 public key (33 or 65 bytes) and return its compressed form."""
    try:
        return coincurve.PublicKey(public_key).format(compressed=True)
    except (ValueError, TypeError):
        raise InvalidField("not a valid secp256k1 public key", field="public_key") from None


def uncompressed_public_key(public_key: bytes) -> bytes:
    """The 65-byte 0x04-prefixed form of a SEC1 public key."""
    try:
        return coincurve.PublicKey(public_key).format(compressed=False)
    except (ValueError, TypeError):
        raise InvalidField("not a valid secp256k1 public key", field="public_key") from None


def sign_digest_with(secret: coincurve.PrivateKey, digest: bytes) -> RecoverableSignature:
    """Sign a 32-byte digest with an in-memory key (RFC 6979 nonce; libsecp256k1 gives low-S)."""
    raw = secret.sign_recoverable(check_digest(digest), hasher=None)
    return RecoverableSignature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    )


def recover_public_key(digest: bytes, signature65: bytes) -> bytes:
    """Recover the compressed public key from a 65-byte r‖s‖recid signature."""
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            signature65, check_digest(digest), hasher=None
        )
    except (ValueError, TypeError):
        raise InvalidSignature("no public key can be recovered from this signature") from None
    return key.format(compressed=True)


def _split_signature(signature: bytes) -> tuple[int, int, int | None]:
    """Parse DER, raw 64-byte r‖s or 65-byte r‖s‖recid into (r, s, recid or None)."""
    if len(signature) == 64:
        return int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"), None
    if len(signature) == 65:
        recid = signature[64]
        if recid >= 27:
            recid -= 27
        return (
            int.from_bytes(signature[:32], "big"),
            int.from_bytes(signature[32:64], "big"),
            recid,
        )
    if signature[:1] == b"\x30":
        try:
            r, s = decode_dss_signature(signature)
        except ValueError:
            raise InvalidSignature("signature is not valid DER") from None
        return r, s, None
    raise InvalidSignature("signature must be DER, 64-byte r||s or 65-byte r||s||v")


def normalize_signature(signature: bytes, digest: bytes, public_key: bytes) -> RecoverableSignature:
    """Turn any backend's signature into a low-S recoverable signature for ``public_key``.

    A high-S signature is flipped to low-S (which flips the recovery id's parity). A given
    recovery id is checked; a missing one is found by recovery. Either way the result must
    recover to ``public_key``, so a device that signed with the wrong key or returned garbage is
    caught here rather than on the chain.
    """
    digest = check_digest(digest)
    expected = compress_public_key(public_key)
    r, s, recid = _split_signature(bytes(signature))
    if not (0 < r < CURVE_ORDER and 0 < s < CURVE_ORDER):
        raise InvalidSignature("signature r or s is out of range")
    if s > HALF_CURVE_ORDER:
        s = CURVE_ORDER - s
        if recid is not None:
            recid ^= 1
    candidates = (recid,) if recid is not None else (0, 1, 2, 3)
    for candidate in candidates:
        if candidate not in (0, 1, 2, 3):
            break
        sig = RecoverableSignature(r, s, candidate)
        try:
            if sig.recover_public_key(digest) == expected:
                return sig
        except InvalidSignature:
            continue
    raise InvalidSignature("signature does not verify against the key's public key")
