"""The local keystore custody backend ("Wallet.data"): a passphrase-sealed SQLite file."""

from signd.custody.keystore.backend import KeystoreBackend
from signd.custody.keystore.sealing import ScryptParams

__all__ = ["KeystoreBackend", "ScryptParams"]
