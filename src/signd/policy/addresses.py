"""Ethereum address text as a policy file gives it, with the EIP-55 checksum enforced.

Kept here rather than imported from ``signd.chains`` so the policy stays a small, pure
package the enclave can load on its own.
"""

from __future__ import annotations

import re
from typing import Final

from signd.crypto.hashing import keccak256
from signd.errors import InvalidField

_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")
_SELECTOR: Final = re.compile(r"0x[0-9a-fA-F]{8}")


def parse_address(text: object) -> bytes:
    """The 20 bytes of ``0x`` + 40 hex digits.

    All lower- or all upper-case digits are accepted as they are; mixed case must carry a
    valid EIP-55 checksum, so a mistyped address in a policy file is caught at load time.
    """
    if not isinstance(text, str) or not _ADDRESS.fullmatch(text):
        raise InvalidField("an address is 0x followed by 40 hex digits", field="address")
    digits = text[2:]
    if digits != digits.lower() and digits != digits.upper() and digits != checksum(digits):
        raise InvalidField(f"address {text} has a bad EIP-55 checksum", field="address")
    return bytes.fromhex(digits)


def checksum(digits: str) -> str:
    """The EIP-55 mixed-case form of 40 hex digits (without ``0x``)."""
    lower = digits.lower()
    nibbles = keccak256(lower.encode("ascii")).hex()
    return "".join(
        char.upper() if char.isalpha() and int(nibble, 16) >= 8 else char
        for char, nibble in zip(lower, nibbles, strict=False)
    )


def to_checksum_address(address: bytes) -> str:
    """``0x`` + the EIP-55 form of a 20-byte address, as refusal messages show it."""
    return "0x" + checksum(address.hex())


def parse_selector(text: object) -> bytes:
    """A 4-byte function selector written ``0x`` + 8 hex digits."""
    if not isinstance(text, str) or not _SELECTOR.fullmatch(text):
        raise InvalidField("a selector is 0x followed by 8 hex digits", field="selector")
    return bytes.fromhex(text[2:])
