"""RLP through the ``rlp`` library, with the strictness a signer needs on the way in.

Decoding rejects trailing bytes, non-canonical length prefixes (``rlp`` checks those) and
integers with leading zero bytes (checked here), and reports every failure as
:class:`signd.errors.InvalidTransaction`.
"""

from __future__ import annotations

import string
from typing import TypeAlias

import rlp

from signd.errors import InvalidTransaction

RLPItem: TypeAlias = bytes | list["RLPItem"]
"""A decoded RLP value: a byte string or a list of items."""

_HEX_DIGITS = frozenset(string.hexdigits)


def is_hex(text: str) -> bool:
    """Whether ``text`` is only hex digits (``int`` and ``bytes.fromhex`` accept more)."""
    return _HEX_DIGITS.issuperset(text)


def int_to_bytes(value: int) -> bytes:
    """The minimal big-endian encoding of a non-negative integer (zero is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def rlp_encode(item: RLPItem) -> bytes:
    """Encode bytes and nested lists of bytes (integers go through :func:`int_to_bytes`)."""
    return bytes(rlp.encode(item, infer_serializer=False))


def rlp_decode(data: bytes) -> RLPItem:
    """Decode exactly one RLP item that fills ``data``."""
    if not isinstance(data, bytes):
        raise InvalidTransaction("RLP input must be bytes")
    try:
        item: RLPItem = rlp.decode(data, strict=True)
    except (rlp.DecodingError, IndexError):
        raise InvalidTransaction("malformed RLP") from None
    return item


def decode_int(item: RLPItem, field: str, max_bits: int = 256) -> int:
    """A canonical RLP integer: a byte string with no leading zero, at most ``max_bits``."""
    if not isinstance(item, bytes):
        raise InvalidTransaction(f"{field} must be an integer, not a list", field=field)
    if item[:1] == b"\x00":
        raise InvalidTransaction(f"{field} has leading zero bytes", field=field)
    if len(item) * 8 > max_bits:
        raise InvalidTransaction(f"{field} does not fit in {max_bits} bits", field=field)
    return int.from_bytes(item, "big")


def decode_bytes(item: RLPItem, field: str) -> bytes:
    """An RLP byte string (not a list)."""
    if not isinstance(item, bytes):
        raise InvalidTransaction(f"{field} must be a byte string, not a list", field=field)
    return item


def decode_list(item: RLPItem, field: str, length: int | None = None) -> list[RLPItem]:
    """An RLP list, of exactly ``length`` items when given."""
    if not isinstance(item, list):
        raise InvalidTransaction(f"{field} must be an RLP list", field=field)
    if length is not None and len(item) != length:
        raise InvalidTransaction(
            f"{field} must have {length} elements, not {len(item)}", field=field
        )
    return item
