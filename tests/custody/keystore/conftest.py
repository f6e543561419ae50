"""Shared fixtures: cheap scrypt, an Ethereum address function, an open keystore."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import coincurve
import pytest

from signd.crypto.hashing import keccak256
from signd.crypto.secret import Secret
from signd.custody.keystore import KeystoreBackend, ScryptParams

CHEAP_KDF = ScryptParams(n=2**10, r=8, p=1)
PASSPHRASE = "keystore-passphrase-d41d8cd98f00b204"


def eth_address(public_key: bytes) -> str:
    """EIP-55 address of a SEC1 public key, built here (custody never imports chains)."""
    raw = keccak256(coincurve.PublicKey(public_key).format(compressed=False)[1:])[-20:].hex()
    nibbles = keccak256(raw.encode()).hex()
    return "0x" + "".join(
        c.upper() if int(n, 16) >= 8 else c for c, n in zip(raw, nibbles[:40], strict=True)
    )


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_keystore(
    path: Path, passphrase: str = PASSPHRASE, *, create: bool = True
) -> KeystoreBackend:
    return KeystoreBackend.open(path, Secret(passphrase), create=create, kdf_params=CHEAP_KDF)


@pytest.fixture
def keystore_path(tmp_path: Path) -> Path:
    return tmp_path / "wallet.data"


@pytest.fixture
def keystore(keystore_path: Path) -> Iterator[KeystoreBackend]:
    backend = open_keystore(keystore_path)
    yield backend
    backend.close()
