"""Hash functions, from well-kept libraries."""

from __future__ import annotations

from Crypto.Hash import keccak as _keccak


def keccak256(data: bytes) -> bytes:
    """Ethereum's keccak-256 (the pre-standard padding, not SHA3-256)."""
    return _keccak.new(digest_bits=256, data=data).digest()
