"""Custody backends: where keys live and how a 32-byte digest gets signed.

Custody never sees a transaction and never picks a hash function; it never imports
``signd.chains``. Addresses are derived by a function the caller passes in.
"""

from signd.custody.base import AddressDeriver, CustodyBackend, KeyInfo, KeyPage

__all__ = ["AddressDeriver", "CustodyBackend", "KeyInfo", "KeyPage"]
