"""Keys, clients files and a settable clock for the auth tests."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signd.auth import ClientsRegistry

NOW = 1_700_000_000.0
BEARER_TOKEN = "bearer-token-0123456789abcdef-never-shown"


@dataclass
class FakeClock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


def ed25519_text(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def p256_text(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "p256:" + base64.b64encode(der).decode()


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def clients_toml(ed_key: ed25519.Ed25519PrivateKey, p256_key: ec.EllipticCurvePrivateKey) -> str:
    return f"""
[[clients]]
id = "wallet-hot"
scopes = ["keys:read", "sign:transaction"]
key_labels = ["hot"]
public_key = "{ed25519_text(ed_key)}"

[[clients]]
id = "mobile"
scopes = ["sign:message"]
key_labels = ["*"]
public_key = "{p256_text(p256_key)}"

[[clients]]
id = "web3-bridge"
scopes = ["sign:transaction", "sign:message"]
key_labels = ["hot", "warm"]
token_sha256 = "{hashlib.sha256(BEARER_TOKEN.encode()).hexdigest()}"
"""


@pytest.fixture
def clients_text(ed_key: ed25519.Ed25519PrivateKey, p256_key: ec.EllipticCurvePrivateKey) -> str:
    return clients_toml(ed_key, p256_key)


@pytest.fixture
def registry(clients_text: str) -> ClientsRegistry:
    return ClientsRegistry.from_bytes(clients_text.encode())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
