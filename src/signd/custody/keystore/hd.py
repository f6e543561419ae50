"""BIP39 mnemonics and BIP32/BIP44 secp256k1 derivation, through bip_utils.

The keystore stores HD keys as (wallet, path) and re-derives them from the wallet's seed.
:class:`HDWallet` caches the parent node of each path it has derived, so deriving the next
address index (or re-deriving a key to sign with) is one BIP32 child step.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from bip_utils import (
    Bip32Slip10Secp256k1,
    Bip39Languages,
    Bip39Mnemonic,
    Bip39MnemonicGenerator,
    Bip39MnemonicValidator,
    Bip39SeedGenerator,
    MnemonicChecksumError,
)

from signd.crypto.secret import Secret
from signd.errors import InvalidField

HARDENED: Final = 0x80000000
MNEMONIC_ENTROPY_BYTES: Final = 32
"""256 bits of entropy: a 24-word mnemonic."""

COIN_TYPES: Final[Mapping[str, int]] = MappingProxyType({"bitcoin": 0, "ethereum": 60, "tron": 195})
"""SLIP-44 coin types of the chains the keystore derives BIP44 keys for."""

_PATH_STEP: Final = re.compile(r"([0-9]{1,10})(['hH]?)", re.ASCII)

KeyPath = tuple[int, ...]
"""A BIP32 path as child indexes, hardened ones with bit 31 set."""


def coin_type(chain: str) -> int:
    """The SLIP-44 coin type of a chain, or :class:`InvalidField` for a chain without one."""
    try:
        return COIN_TYPES[chain]
    except KeyError:
        raise InvalidField(
            f"no BIP44 coin type for chain {chain!r}; known: {', '.join(COIN_TYPES)}",
            field="chain",
        ) from None


def bip44_receive_parent(chain: str, account: int = 0) -> KeyPath:
    """``m/44'/COIN'/ACCOUNT'/0``: the parent of a chain's receiving addresses."""
    return (44 | HARDENED, coin_type(chain) | HARDENED, account | HARDENED, 0)


def parse_path(path: str) -> KeyPath:
    """Parse an absolute BIP32 path such as ``m/44'/60'/0'/0/7`` (``h`` also marks hardened)."""
    steps = path.split("/") if isinstance(path, str) else []
    if len(steps) < 2 or steps[0] != "m":
        raise InvalidField(
            "path must be an absolute BIP32 path like m/44'/60'/0'/0/0", field="path"
        )
    indexes = []
    for step in steps[1:]:
        match = _PATH_STEP.fullmatch(step)
        if match is None or int(match[1]) >= HARDENED:
            raise InvalidField("path is not a valid BIP32 path", field="path")
        indexes.append(int(match[1]) | (HARDENED if match[2] else 0))
    return tuple(indexes)


def format_path(path: KeyPath) -> str:
    """The canonical text of a path, hardened steps marked with ``'``."""
    steps = (f"{i & ~HARDENED}'" if i & HARDENED else str(i) for i in path)
    return "/".join(("m", *steps))


def new_mnemonic() -> Secret:
    """A fresh 24-word English mnemonic from the OS CSPRNG."""
    return mnemonic_from_entropy(secrets.token_bytes(MNEMONIC_ENTROPY_BYTES))


def mnemonic_from_entropy(entropy: bytes) -> Secret:
    """The English BIP39 mnemonic that encodes ``entropy``."""
    generator = Bip39MnemonicGenerator(Bip39Languages.ENGLISH)
    return Secret(generator.FromEntropy(entropy).ToStr())


def normalize_mnemonic(mnemonic: Secret) -> Secret:
    """Check a mnemonic's words and checksum; return it NFKD-normalised, single-spaced."""
    try:
        words = mnemonic.reveal_bytes().decode()
        Bip39MnemonicValidator().Validate(words)
        return Secret(Bip39Mnemonic.FromString(words).ToStr())
    except (ValueError, TypeError, MnemonicChecksumError):
        raise InvalidField("mnemonic is not a valid BIP39 mnemonic", field="mnemonic") from None


def seed_from_mnemonic(mnemonic: Secret, passphrase: Secret | None = None) -> bytes:
    """The 64-byte BIP39 seed of a mnemonic and optional BIP39 passphrase."""
    words = normalize_mnemonic(mnemonic).reveal_bytes().decode()
    extra = passphrase.reveal_bytes().decode() if passphrase is not None else ""
    return bytes(Bip39SeedGenerator(words).Generate(extra))


class HDWallet:
    """An unsealed BIP32 master node with a cache of derived parent nodes."""

    __slots__ = ("_master", "_parents")

    def __init__(self, seed: bytes) -> None:
        self._master: Any = Bip32Slip10Secp256k1.FromSeed(seed)
        self._parents: dict[KeyPath, Any] = {(): self._master}

    def node(self, path: KeyPath) -> Any:
        """The bip_utils BIP32 node at ``path``; its parent node is cached."""
        return self.parent(path[:-1]).ChildKey(path[-1]) if path else self._master

    def parent(self, path: KeyPath) -> Any:
        """The node at ``path``, derived once and then served from the cache."""
        node = self._parents.get(path)
        if node is None:
            node = self._master
            for index in path:
                node = node.ChildKey(index)
            self._parents[path] = node
        return node

    def private_key(self, path: KeyPath) -> bytes:
        """The 32-byte private scalar at ``path``."""
        return bytes(self.node(path).PrivateKey().Raw().ToBytes())

    def __repr__(self) -> str:
        return "HDWallet(<sealed>)"
