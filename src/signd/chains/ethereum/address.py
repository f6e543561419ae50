"""Ethereum addresses: derivation from a public key and EIP-55 checksums."""

from __future__ import annotations

import functools

from signd.chains.ethereum.encoding import is_hex
from signd.crypto.hashing import keccak256
from signd.crypto.secp256k1 import uncompressed_public_key
from signd.errors import InvalidField

ADDRESS_SIZE = 20
CHECKSUMS_REMEMBERED = 65_536


def _checksum(hex40: str) -> str:
    """EIP-55: upper-case each letter whose nibble in keccak(lower-case hex) is >= 8."""
    return _checksum_of_lower(hex40.lower())


@functools.lru_cache(maxsize=CHECKSUMS_REMEMBERED)
def _checksum_of_lower(lower: str) -> str:
    """:func:`_checksum` of lower-case hex, remembered: a service checks and writes the same
    few addresses (its keys, the usual destinations) over and over, a keccak each time."""
    digest = keccak256(lower.encode("ascii")).hex()
    return "0x" + "".join(
        char.upper() if nibble >= "8" else char for char, nibble in zip(lower, digest, strict=False)
    )


def _hex40(value: object, field: str) -> str:
    """The 40 hex digits of a ``0x``-prefixed address string, case kept."""
    if not isinstance(value, str):
        raise InvalidField(f"{field} must be a 0x-prefixed hex address string", field=field)
    if len(value) != 2 + 2 * ADDRESS_SIZE or value[:2] != "0x" or not is_hex(value[2:]):
        raise InvalidField(f"{field} must be 0x followed by 40 hex digits", field=field)
    return value[2:]


def to_checksum_address(address: str | bytes) -> str:
    """The EIP-55 form of a 20-byte address or of a hex address in any case."""
    if isinstance(address, bytes):
        if len(address) != ADDRESS_SIZE:
            raise InvalidField("an address is 20 bytes", field="address")
        return _checksum(address.hex())
    return _checksum(_hex40(address, "address"))


def parse_address(value: object, field: str = "to") -> bytes:
    """Parse a hex address: all-lower or all-upper, or mixed case with a valid EIP-55 checksum."""
    hex40 = _hex40(value, field)
    if hex40 != hex40.lower() and hex40 != hex40.upper() and "0x" + hex40 != _checksum(hex40):
        raise InvalidField(f"{field} has an invalid EIP-55 checksum", field=field)
    return bytes.fromhex(hex40)


def canonical_address(value: str) -> str:
    """The checksummed form of an address given in any accepted spelling (a lookup key)."""
    return _checksum(parse_address(value, field="address").hex())


def address_from_public_key(public_key: bytes) -> str:
    """The checksummed address of a SEC1 public key (compressed or uncompressed)."""
    point = uncompressed_public_key(public_key)
    return _checksum(keccak256(point[1:])[-ADDRESS_SIZE:].hex())
