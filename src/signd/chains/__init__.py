"""Chain encoders: addresses, transactions and message digests, with no I/O and no keys.

Each chain package turns public keys into addresses and requests into the exact 32-byte
digests a custody backend signs, then assembles the signed result.
"""

from __future__ import annotations

from collections.abc import Callable

from signd.chains.ethereum.address import address_from_public_key as _ethereum_address
from signd.errors import InvalidField

_ADDRESS_DERIVERS: dict[str, Callable[[bytes], str]] = {"ethereum": _ethereum_address}


def address_deriver(chain: str) -> Callable[[bytes], str]:
    """The function that turns a SEC1 public key into ``chain``'s address string."""
    try:
        return _ADDRESS_DERIVERS[chain]
    except (KeyError, TypeError):
        raise InvalidField(f"unknown chain {chain!r}", field="chain") from None
