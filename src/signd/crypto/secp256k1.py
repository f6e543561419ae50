"""secp256k1 through coincurve (libsecp256k1), and the one signature normaliser.

Every custody backend returns whatever its device gives (DER from KMS, raw r‖s from PKCS#11,
65-byte r‖s‖recid from a local key, possibly high-S). :func:`normalize_signature` turns any of
those into a :class:`RecoverableSignature`: low-S, with the recovery id checked against the
key's public key. Chain modules turn that into chain-specific forms (Ethereum's v, DER, ...).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, TypeVar

import coincurve
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signd.errors import InvalidField, InvalidSignature, SigndError

Signer = TypeVar("Signer")

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_CURVE_ORDER = CURVE_ORDER // 2
DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class RecoverableSignature:
    """A normalised ECDSA signature: 0 < r < n, 0 < s <= n/2, recovery id 0..3."""

    r: int
    s: int
    recovery_id: int
    _bytes: bytes | None = field(default=None, init=False, compare=False, repr=False)
    """The 65-byte form, once made (a signature is turned into bytes for its answer, its
    audit digest and its chain's encoding)."""

    def __post_init__(self) -> None:
        if not (0 < self.r < CURVE_ORDER and 0 < self.s <= HALF_CURVE_ORDER):
            raise InvalidSignature("signature r or s is out of range or high-S")
        if self.recovery_id not in (0, 1, 2, 3):
            raise InvalidSignature("recovery id must be 0, 1, 2 or 3")

    def to_bytes(self) -> bytes:
        """The 65-byte form r(32) ‖ s(32) ‖ recovery id."""
        if self._bytes is None:
            data = (
                self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([self.recovery_id])
            )
            object.__setattr__(self, "_bytes", data)
            return data
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoverableSignature:
        if len(data) != 65:
            raise InvalidSignature("a recoverable signature is 65 bytes")
        signature = cls(
            int.from_bytes(data[:32], "big"), int.from_bytes(data[32:64], "big"), data[64]
        )
        object.__setattr__(signature, "_bytes", bytes(data))
        return signature

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
    return RecoverableSignature.from_bytes(
        secret.sign_recoverable(check_digest(digest), hasher=None)
    )


PARALLEL_MIN: Final = 16
"""The fewest signatures :func:`sign_digests_with` shares out between threads; below it,
handing work to another thread costs more than it saves. (On two cores, per signature:
4 alone 33.6 µs, shared 38.4; 12: 33.5 and 25.1; 16: 33.4 and 27.4; 64: 33.5 and 18.5.)"""

_helpers_lock = threading.Lock()
_helpers: tuple[ThreadPoolExecutor, int] | None = None


def _signing_helpers() -> tuple[ThreadPoolExecutor, int]:
    """The shared pool of signing threads (one per core but the caller's), and its size."""
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            size = max(1, len(os.sched_getaffinity(0)) - 1)
            _helpers = ThreadPoolExecutor(max_workers=size, thread_name_prefix="signd-sign"), size
        return _helpers


def _sign_part(
    pairs: Sequence[tuple[coincurve.PrivateKey, bytes]],
) -> list[bytes]:
    return [secret.sign_recoverable(digest, hasher=None) for secret, digest in pairs]


def sign_digests_with(
    pairs: Sequence[tuple[coincurve.PrivateKey, bytes]],
) -> list[RecoverableSignature]:
    """:func:`sign_digest_with` for many (key, digest) pairs, in order, on every core.

    libsecp256k1 signs without the interpreter lock, so from :data:`PARALLEL_MIN` pairs on,
    helper threads sign parts of the list while the calling thread signs the first, with no
    other Python work in between: the caller waits for them, and two cores sign ≈ 1.8×
    what one does. Every digest is checked before any is signed.
    """
    digests = [check_digest(digest) for _, digest in pairs]
    work = [(secret, digest) for (secret, _), digest in zip(pairs, digests, strict=True)]
    helpers, size = _signing_helpers() if len(work) >= PARALLEL_MIN else (None, 0)
    if helpers is None:
        raw = _sign_part(work)
    else:
        step = -(-len(work) // (size + 1))
        parts = [
            helpers.submit(_sign_part, work[i : i + step]) for i in range(step, len(work), step)
        ]
        raw = _sign_part(work[:step])
        for part in parts:
            raw.extend(part.result())
    return list(map(RecoverableSignature.from_bytes, raw))


def signatures_or_errors(
    pairs: Sequence[tuple[Signer, bytes]], sign: Callable[[Signer, bytes], RecoverableSignature]
) -> list[RecoverableSignature | SigndError]:
    """``sign`` of each (signer, digest) pair, in order; one that raises a
    :class:`~signd.errors.SigndError` gives it in its place."""
    signatures: list[RecoverableSignature | SigndError] = []
    for signer, digest in pairs:
        try:
            signatures.append(sign(signer, digest))
        except SigndError as exc:
            signatures.append(exc)
    return signatures


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
    recovery id is checked by recovering the public key with it; a missing one is read off the
    nonce point R, which verifying the signature against ``public_key`` yields anyway (see
    :func:`_verified_recovery_id`). Either way the result must belong to ``public_key``, so a
    device that signed with the wrong key or returned garbage is caught here rather than on
    the chain.
    """
    digest = check_digest(digest)
    expected = _canonical_public_key(bytes(public_key))
    r, s, recid = _split_signature(bytes(signature))
    if not (0 < r < CURVE_ORDER and 0 < s < CURVE_ORDER):
        raise InvalidSignature("signature r or s is out of range")
    if s > HALF_CURVE_ORDER:
        s = CURVE_ORDER - s
        if recid is not None:
            recid ^= 1
    if recid is None:
        recid = _verified_recovery_id(r, s, digest, expected)
    elif recid not in (0, 1, 2, 3) or _recover(r, s, recid, digest) != expected:
        raise InvalidSignature("signature does not verify against the key's public key")
    return RecoverableSignature(r, s, recid)


@functools.lru_cache(maxsize=4096)
def _canonical_public_key(public_key: bytes) -> bytes:
    """:func:`compress_public_key`, remembered: backends sign with the same keys over and over."""
    return compress_public_key(public_key)


def _recover(r: int, s: int, recid: int, digest: bytes) -> bytes | None:
    """The compressed public key that (r, s, recid) recovers to over ``digest``, or ``None``."""
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([recid])
    try:
        key = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    except ValueError:
        return None
    return key.format(compressed=True)


def _verified_recovery_id(r: int, s: int, digest: bytes, public_key: bytes) -> int:
    """Verify (r, s) over ``digest`` against the compressed ``public_key``; R's recovery id.

    ECDSA verification computes the nonce point R = s⁻¹·(e·G + r·Q) and checks x(R) ≡ r; the
    recovery id is R's y parity, plus 2 when x(R) ≥ n. libsecp256k1 offers no bare double
    multiplication, but public-key recovery is one: it returns r'⁻¹·(s'·R' − e'·G) for the
    point R' named by (r', recovery id). Naming Q itself (r' = x(Q), the id from Q's parity)
    with s' = r'·r·s⁻¹ and e' = −r'·e·s⁻¹ makes it return exactly R, in one multiplication
    instead of recovering a key for each candidate id (1.5 on average). An R at infinity makes
    the recovery fail, as verification would.
    """
    q_x = int.from_bytes(public_key[1:], "big")
    q_id = public_key[0] & 1
    if q_x >= CURVE_ORDER:
        q_x -= CURVE_ORDER
        q_id |= 2
    if q_x == 0:
        # The two keys with x(Q) = n cannot be named as an r'; search the ids instead.
        for candidate in (0, 1, 2, 3):
            if _recover(r, s, candidate, digest) == public_key:
                return candidate
        raise InvalidSignature("signature does not verify against the key's public key")
    s_inverse = pow(s, -1, CURVE_ORDER)
    e = int.from_bytes(digest, "big") % CURVE_ORDER
    s_prime = q_x * r % CURVE_ORDER * s_inverse % CURVE_ORDER
    e_prime = -q_x * e % CURVE_ORDER * s_inverse % CURVE_ORDER
    nonce_point = _recover(q_x, s_prime, q_id, e_prime.to_bytes(32, "big"))
    if nonce_point is None:
        raise InvalidSignature("signature does not verify against the key's public key")
    nonce_x = int.from_bytes(nonce_point[1:], "big")
    if nonce_x % CURVE_ORDER != r:
        raise InvalidSignature("signature does not verify against the key's public key")
    return (nonce_point[0] & 1) | (2 if nonce_x >= CURVE_ORDER else 0)
