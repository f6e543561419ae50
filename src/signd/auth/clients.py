"""Registered API clients, their scopes and key-label restrictions, loaded from TOML.

The clients file::

    [[clients]]
    id = "wallet-hot"
    scopes = ["keys:read", "sign:transaction"]
    key_labels = ["hot"]                       # or ["*"] for every key
    public_key = "ed25519:<base64 of the raw 32-byte key>"

    [[clients]]
    id = "web3-bridge"
    scopes = ["sign:transaction", "sign:message"]
    key_labels = ["*"]
    token_sha256 = "<hex SHA-256 of the bearer token>"

A client has exactly one credential: a request-signing public key (``ed25519:`` raw key or
``p256:`` SubjectPublicKeyInfo DER, both base64) or the SHA-256 of a bearer token. Anything
unexpected (unknown key, scope or key type, duplicate id or token) is a
:class:`~signd.errors.ConfigurationError` naming the client. :attr:`ClientsRegistry.sha256`
is the SHA-256 of the file's bytes, for logs and the attestation document's ``user_data``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_der_public_key

from signd.errors import AccessDenied, ConfigurationError

ALL_KEYS: Final = "*"
MAX_CLIENT_ID_LENGTH: Final = 64
_CLIENT_KEYS: Final = frozenset({"id", "scopes", "key_labels", "public_key", "token_sha256"})
_FILE_KEYS: Final = frozenset({"version", "clients"})


class Scope(enum.StrEnum):
    """What a client may ask for."""

    KEYS_CREATE = "keys:create"
    KEYS_READ = "keys:read"
    SIGN_HASH = "sign:hash"
    SIGN_TRANSACTION = "sign:transaction"
    SIGN_MESSAGE = "sign:message"


SCOPES: Final = frozenset(scope.value for scope in Scope)

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
"""A request-signing public key: Ed25519, or ECDSA on P-256."""

Credential = Literal["signature", "bearer"]


def check_client_id(client_id: object) -> str:
    """A client id: 1-64 printable ASCII characters without spaces."""
    if (
        not isinstance(client_id, str)
        or not 0 < len(client_id) <= MAX_CLIENT_ID_LENGTH
        or not client_id.isascii()
        or not client_id.isprintable()
        or " " in client_id
    ):
        raise ConfigurationError(
            f"a client id must be 1-{MAX_CLIENT_ID_LENGTH} printable ASCII characters "
            "without spaces"
        )
    return client_id


def labels_match(allowed: frozenset[str], key_labels: Iterable[str]) -> bool:
    """Whether a key with ``key_labels`` falls under ``allowed`` (``*`` or a shared label)."""
    return ALL_KEYS in allowed or not allowed.isdisjoint(key_labels)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: who it is, what it may do and with which keys."""

    client_id: str
    scopes: frozenset[str]
    key_labels: frozenset[str]
    """The labels of the keys this client may use; ``{"*"}`` for every key."""
    credential: Credential

    def has_scope(self, scope: str) -> bool:
        if scope not in SCOPES:
            raise ConfigurationError(f"unknown scope {scope!r}")
        return scope in self.scopes

    def require(self, scope: str) -> None:
        """Raise :class:`~signd.errors.AccessDenied` unless the client holds ``scope``."""
        if not self.has_scope(scope):
            raise AccessDenied(f"client {self.client_id!r} lacks scope {scope}")

    def may_use(self, key_labels: Iterable[str]) -> bool:
        """Whether this client may use a key labelled ``key_labels`` (one shared label is
        enough; an unrestricted client may use every key, labelled or not)."""
        return labels_match(self.key_labels, key_labels)

    def may_label(self, labels: Iterable[str]) -> bool:
        """Whether this client may create a key labelled ``labels``: every label must be one
        of its own, so a restricted client cannot create keys for other clients' labels, and
        at least one is needed, so it can use the key it created."""
        wanted = frozenset(labels)
        if ALL_KEYS in self.key_labels:
            return True
        return bool(wanted) and wanted <= self.key_labels


@dataclass(frozen=True, slots=True)
class RegisteredClient:
    """One entry of the clients file. ``repr`` shows no credential material."""

    client_id: str
    scopes: frozenset[str]
    key_labels: frozenset[str]
    public_key: PublicKey | None
    token_sha256: bytes | None

    def __repr__(self) -> str:
        kind = "bearer" if self.token_sha256 is not None else _key_kind(self.public_key)
        return (
            f"RegisteredClient(client_id={self.client_id!r}, scopes={sorted(self.scopes)}, "
            f"key_labels={sorted(self.key_labels)}, credential={kind})"
        )

    def principal(self, credential: Credential) -> Principal:
        return Principal(self.client_id, self.scopes, self.key_labels, credential)


class ClientsRegistry:
    """The validated clients file: look-ups by id and by bearer-token hash."""

    def __init__(self, clients: Sequence[RegisteredClient], *, sha256: str) -> None:
        self._clients: dict[str, RegisteredClient] = {}
        for client in clients:
            if client.client_id in self._clients:
                raise ConfigurationError(f"client {client.client_id!r} is registered twice")
            self._clients[client.client_id] = client
        self._bearers = tuple(
            (c.token_sha256, c.principal("bearer")) for c in clients if c.token_sha256 is not None
        )
        """Each bearer client's token hash, and the principal it authenticates as."""
        hashes = [token_sha256 for token_sha256, _ in self._bearers]
        if len(set(hashes)) != len(hashes):
            raise ConfigurationError("two clients share the same bearer token")
        self.sha256 = sha256

    def __repr__(self) -> str:
        return f"ClientsRegistry(clients={len(self._clients)}, sha256={self.sha256[:16]}...)"

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    @classmethod
    def load(cls, path: str | Path) -> ClientsRegistry:
        """Read and validate a clients file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the clients file {path}: {exc.strerror}"
            ) from None
        return cls.from_bytes(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientsRegistry:
        """Validate a clients file given as bytes (as the host hands it to the enclave)."""
        try:
            document = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"clients file is not valid TOML: {exc}") from None
        unknown = set(document) - _FILE_KEYS
        if unknown:
            raise ConfigurationError(f"clients file: unknown keys {sorted(unknown)}")
        if document.get("version", 1) != 1:
            raise ConfigurationError("clients file: only version = 1 is supported")
        entries = document.get("clients", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigurationError("clients file: [[clients]] must be an array of tables")
        clients = [_parse_client(index, entry) for index, entry in enumerate(entries)]
        return cls(clients, sha256=hashlib.sha256(data).hexdigest())

    def get(self, client_id: str) -> RegisteredClient | None:
        return self._clients.get(client_id)

    def clients(self) -> tuple[RegisteredClient, ...]:
        return tuple(self._clients.values())

    def verify_bearer(self, token: str) -> Principal:
        """The bearer client holding ``token``.

        The token's SHA-256 is compared with every registered hash in constant time, all of
        them every time, so neither the answer's timing nor its content says how close a
        guess came.
        """
        if not isinstance(token, str) or not token:
            raise AccessDenied("missing bearer token")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for token_sha256, principal in self._bearers:
            if hmac.compare_digest(digest, token_sha256):
                found = principal
        if found is None:
            raise AccessDenied("unknown bearer token")
        return found


def parse_public_key(text: str) -> PublicKey:
    """``ed25519:<base64 raw 32 bytes>`` or ``p256:<base64 SubjectPublicKeyInfo DER>``."""
    kind, sep, encoded = text.partition(":")
    if not sep:
        raise ConfigurationError("public_key must be 'ed25519:<base64>' or 'p256:<base64>'")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("public_key is not valid base64") from None
    if kind == "ed25519":
        if len(raw) != 32:
            raise ConfigurationError("an ed25519 public_key is 32 raw bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if kind == "p256":
        try:
            key = load_der_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigurationError("a p256 public_key is a SubjectPublicKeyInfo DER") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigurationError("a p256 public_key must be on the P-256 curve")
        return key
    raise ConfigurationError(f"unknown public_key type {kind!r} (ed25519 or p256)")


def _key_kind(key: PublicKey | None) -> str:
    return "ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "p256"


def _parse_client(index: int, entry: Mapping[str, Any]) -> RegisteredClient:
    raw_id = entry.get("id")
    try:
        client_id = check_client_id(raw_id)
    except ConfigurationError as exc:
        raise ConfigurationError(f"clients[{index}]: {exc.message}") from None
    where = f"client {client_id!r}"
    unknown = set(entry) - _CLIENT_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
    scopes = _string_list(entry, "scopes", where)
    bad = [scope for scope in scopes if scope not in SCOPES]
    if bad:
        raise ConfigurationError(f"{where}: unknown scopes {bad} (known: {sorted(SCOPES)})")
    labels = _string_list(entry, "key_labels", where)
    if ALL_KEYS in labels and len(labels) > 1:
        raise ConfigurationError(f"{where}: key_labels ['*'] cannot be mixed with labels")
    has_key, has_token = "public_key" in entry, "token_sha256" in entry
    if has_key == has_token:
        raise ConfigurationError(f"{where}: give exactly one of public_key or token_sha256")
    public_key: PublicKey | None = None
    token_sha256: bytes | None = None
    if has_key:
        if not isinstance(entry["public_key"], str):
            raise ConfigurationError(f"{where}: public_key must be a string")
        try:
            public_key = parse_public_key(entry["public_key"])
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc.message}") from None
    else:
        token_sha256 = _token_hash(entry["token_sha256"], where)
    return RegisteredClient(
        client_id, frozenset(scopes), frozenset(labels), public_key, token_sha256
    )


def _string_list(entry: Mapping[str, Any], name: str, where: str) -> list[str]:
    value = entry.get(name)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise ConfigurationError(f"{where}: {name} must be a non-empty list of strings")
    return value


def _token_hash(value: object, where: str) -> bytes:
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ConfigurationError(f"{where}: token_sha256 must be 64 hex characters")
