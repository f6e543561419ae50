"""The clients file: strict validation, digests, principals."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signd.auth import ClientsRegistry, Principal, Scope, parse_public_key
from signd.errors import AccessDenied, ConfigurationError
from tests.auth.conftest import BEARER_TOKEN, ed25519_text, p256_text

TOKEN_HASH = hashlib.sha256(b"t").hexdigest()


def one_client(**fields: str) -> bytes:
    entry = {
        "id": '"c1"',
        "scopes": '["sign:hash"]',
        "key_labels": '["hot"]',
        "token_sha256": f'"{TOKEN_HASH}"',
    }
    entry.update(fields)
    body = "\n".join(f"{k} = {v}" for k, v in entry.items() if v != "")
    return f"[[clients]]\n{body}\n".encode()


def test_valid_file_loads_every_client(registry: ClientsRegistry, clients_text: str) -> None:
    assert len(registry) == 3
    hot = registry.get("wallet-hot")
    assert hot is not None
    assert hot.scopes == {"keys:read", "sign:transaction"}
    assert isinstance(hot.public_key, ed25519.Ed25519PublicKey)
    mobile = registry.get("mobile")
    assert mobile is not None
    assert isinstance(mobile.public_key, ec.EllipticCurvePublicKey)
    assert registry.get("nobody") is None
    assert registry.sha256 == hashlib.sha256(clients_text.encode()).hexdigest()


def test_load_reads_the_file(tmp_path: Path, clients_text: str) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(clients_text)
    assert ClientsRegistry.load(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigurationError, match="cannot read"):
        ClientsRegistry.load(tmp_path / "missing.toml")


def test_reprs_show_no_credentials(registry: ClientsRegistry) -> None:
    bridge = registry.get("web3-bridge")
    assert bridge is not None and bridge.token_sha256 is not None
    text = repr(bridge) + repr(registry) + repr(registry.clients())
    assert bridge.token_sha256.hex() not in text
    assert "credential=bearer" in text
    assert "credential=ed25519" in text and "credential=p256" in text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scopes": '["sign:everything"]'}, r"client 'c1': unknown scopes \['sign:everything'\]"),
        ({"scopes": "[]"}, "client 'c1': scopes must be a non-empty list"),
        ({"key_labels": '["*", "hot"]'}, "client 'c1': key_labels"),
        ({"key_labels": '"hot"'}, "client 'c1': key_labels must be a non-empty list"),
        ({"public_key": '"rsa:AAAA"'}, "client 'c1': give exactly one"),
        ({"token_sha256": "", "public_key": '"rsa:AAAA"'}, "client 'c1': unknown public_key type"),
        ({"token_sha256": ""}, "client 'c1': give exactly one"),
        ({"token_sha256": '"abcd"'}, "client 'c1': token_sha256 must be 64 hex"),
        ({"token_sha256": '"' + "zz" * 32 + '"'}, "client 'c1': token_sha256 must be 64 hex"),
        ({"colour": '"blue"'}, r"client 'c1': unknown keys \['colour'\]"),
        ({"id": '"has space"'}, r"clients\[0\]: a client id"),
        ({"id": "7"}, r"clients\[0\]: a client id"),
    ],
)
def test_invalid_client_is_refused_naming_it(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ClientsRegistry.from_bytes(one_client(**fields))


@pytest.mark.parametrize(
    ("public_key", "message"),
    [
        ("ed25519:!!!", "not valid base64"),
        ("ed25519:" + base64.b64encode(b"x" * 31).decode(), "32 raw bytes"),
        ("p256:" + base64.b64encode(b"not der").decode(), "SubjectPublicKeyInfo"),
        ("nocolon", "must be 'ed25519:<base64>'"),
    ],
)
def test_bad_public_keys_are_refused(public_key: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"client 'c1': .*{message}"):
        ClientsRegistry.from_bytes(one_client(token_sha256="", public_key=f'"{public_key}"'))


def test_p256_key_must_be_on_p256(ed_key: ed25519.Ed25519PrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = p384.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigurationError, match="P-256 curve"):
        parse_public_key("p256:" + base64.b64encode(der).decode())
    ed_der = ed_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigurationError, match="P-256 curve"):
        parse_public_key("p256:" + base64.b64encode(ed_der).decode())


def test_both_key_kinds_parse(ed_key: ed25519.Ed25519PrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    assert isinstance(parse_public_key(ed25519_text(ed_key)), ed25519.Ed25519PublicKey)
    assert isinstance(parse_public_key(p256_text(p256)), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"[[clients]\n", "not valid TOML"),
        (b"\xff\xfe", "not valid TOML"),
        (b"admins = []\n", r"unknown keys \['admins'\]"),
        (b"version = 2\n", "only version = 1"),
        (b"clients = 3\n", "array of tables"),
    ],
)
def test_invalid_files_are_refused(document: bytes, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ClientsRegistry.from_bytes(document)


def test_duplicate_ids_and_tokens_are_refused() -> None:
    twice = one_client() + one_client(token_sha256='"' + "11" * 32 + '"')
    with pytest.raises(ConfigurationError, match="'c1' is registered twice"):
        ClientsRegistry.from_bytes(twice)
    shared = one_client() + one_client(id='"c2"')
    with pytest.raises(ConfigurationError, match="share the same bearer token"):
        ClientsRegistry.from_bytes(shared)


def test_an_empty_file_registers_nobody() -> None:
    registry = ClientsRegistry.from_bytes(b"")
    assert len(registry) == 0
    with pytest.raises(AccessDenied):
        registry.verify_bearer(BEARER_TOKEN)


def test_principal_scopes() -> None:
    principal = Principal("c", frozenset({"sign:message"}), frozenset({"hot"}), "signature")
    principal.require(Scope.SIGN_MESSAGE)
    principal.require("sign:message")
    with pytest.raises(AccessDenied, match="client 'c' lacks scope sign:hash"):
        principal.require(Scope.SIGN_HASH)
    with pytest.raises(ConfigurationError, match="unknown scope"):
        principal.require("sign:mesage")


def test_principal_key_labels() -> None:
    hot = Principal("c", frozenset(), frozenset({"hot", "warm"}), "signature")
    assert hot.may_use(["hot"])
    assert hot.may_use(("cold", "warm"))
    assert not hot.may_use(["cold"])
    assert not hot.may_use([])
    assert hot.may_label(["hot", "warm"])
    assert not hot.may_label(["hot", "cold"])
    assert not hot.may_label([])
    anyone = Principal("c", frozenset(), frozenset({"*"}), "signature")
    assert anyone.may_use([]) and anyone.may_use(["cold"])
    assert anyone.may_label([]) and anyone.may_label(["cold"])


def test_bearer_tokens(registry: ClientsRegistry) -> None:
    principal = registry.verify_bearer(BEARER_TOKEN)
    assert principal.client_id == "web3-bridge"
    assert principal.credential == "bearer"
    assert principal.key_labels == {"hot", "warm"}
    for wrong in (BEARER_TOKEN + "x", BEARER_TOKEN[:-1], BEARER_TOKEN.upper()):
        with pytest.raises(AccessDenied, match="unknown bearer token") as info:
            registry.verify_bearer(wrong)
        assert wrong not in str(info.value)
    with pytest.raises(AccessDenied, match="missing bearer token"):
        registry.verify_bearer("")
