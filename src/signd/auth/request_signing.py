"""Request signatures, scheme v1: the client signs each request, the enclave verifies it.

A signed request carries four headers::

    X-Signd-Client:     the client id
    X-Signd-Timestamp:  unix seconds, decimal
    X-Signd-Nonce:      16 to 64 random bytes, lower-case hex
    X-Signd-Signature:  base64 of the signature over the canonical string

and the canonical string is (UTF-8, ``\\n`` separated, no trailing newline)::

    signd-request-v1
    METHOD
    /path?query
    hex(sha256(body))
    timestamp
    nonce

Ed25519 keys sign the canonical bytes; P-256 keys sign them with ECDSA over SHA-256 and send
the raw 64-byte ``r || s`` (IEEE P1363, as WebCrypto produces), not DER.

:class:`RequestVerifier` refuses an unknown client, a bad signature, a timestamp more than
``window`` seconds from its clock, a nonce it has seen and any malformed header. A nonce is
remembered until its request's timestamp leaves the window; after that the timestamp check
refuses the request anyway, so forgetting it is safe. If ``nonce_capacity`` nonces are live
at once, or ``nonce_quota`` of one client's, new requests (of that client) are refused rather
than old nonces forgotten: one client cannot fill the store and lock the others out.

**Presenting a request again.** The enclave's gate performs a request's calls as the host
forwards them, and a JSON-RPC batch arrives one item at a time, so :meth:`RequestVerifier.present`
lets the same signed request be shown again (its signature covers the body, so it is the same
body) and :meth:`RequestVerifier.perform` lets each of its calls be performed once: a replay
of a performed call, or of a request whose calls are all performed, is refused.

Nonces live in enclave memory, so a restarted enclave has forgotten them. A host that restarts
the enclave to replay recent requests is stopped by ``not_before``: requests signed before the
verifier was created are refused (a client whose request straddles a restart retries).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from signd.auth.clients import ClientsRegistry, Principal
from signd.errors import AccessDenied, ConfigurationError, InvalidField, shown

SCHEME: Final = "signd-request-v1"
HEADER_CLIENT: Final = "X-Signd-Client"
HEADER_TIMESTAMP: Final = "X-Signd-Timestamp"
HEADER_NONCE: Final = "X-Signd-Nonce"
HEADER_SIGNATURE: Final = "X-Signd-Signature"
SIGNED_HEADER_PREFIX: Final = "x-signd-"
"""What the (lower-case) names of the request-signature headers start with."""
NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 64
DEFAULT_WINDOW: Final = 300
DEFAULT_NONCE_CAPACITY: Final = 1_000_000
MAX_NONCE_CAPACITY: Final = 100_000_000
"""The most nonce capacity a configuration may ask for (about 10 GB of enclave memory)."""
NONCE_QUOTA_SHARE: Final = 4
"""By default a client may hold a quarter of the nonce capacity live."""

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
"""A request-signing private key: Ed25519, or ECDSA on P-256."""

_METHOD: Final = re.compile(r"[A-Z]{1,16}")
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")
_NONCE: Final = re.compile(rf"(?:[0-9a-f]{{2}}){{{NONCE_BYTES},{MAX_NONCE_BYTES}}}")
_P256_SIGNATURE_BYTES: Final = 64
_MAX_SIGNATURE_TEXT: Final = 128
_DIGEST_BYTES: Final = 16
_DIGEST_KEY_BYTES: Final = 32


class RegistrySource(Protocol):
    """Anything that gives the clients registry in force (a reloadable holder does)."""

    @property
    def current(self) -> ClientsRegistry: ...


def canonical_request(method: str, path: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    """The bytes a v1 request signature covers. Refuses input that could blur the fields."""
    if not _METHOD.fullmatch(method):
        raise InvalidField("method must be 1-16 upper-case letters", field="method")
    if not path.startswith("/") or not path.isascii() or not path.isprintable() or " " in path:
        raise InvalidField("path must start with '/' and be printable ASCII", field="path")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise InvalidField("timestamp must be decimal unix seconds", field="timestamp")
    if not _NONCE.fullmatch(nonce):
        raise InvalidField(
            f"nonce must be {NONCE_BYTES}-{MAX_NONCE_BYTES} bytes in lower-case hex", field="nonce"
        )
    body_hash = hashlib.sha256(body).hexdigest()
    return "\n".join((SCHEME, method, path, body_hash, timestamp, nonce)).encode("ascii")


def default_nonce_quota(capacity: int) -> int:
    """The live nonces one client may hold when no quota is configured: a quarter of
    ``capacity`` (250,000 of the default million, about 830 requests a second kept up over
    a 300 s window), so that no one client can fill the tracker."""
    return max(1, capacity // NONCE_QUOTA_SHARE)


def sign_request(
    method: str,
    path: str,
    body: bytes,
    client_id: str,
    private_key: PrivateKey,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four ``X-Signd-*`` headers for a request (client side).

    ``path`` is the path with its query string, exactly as sent. ``now`` defaults to the
    current time; ``nonce`` to 16 fresh random bytes.
    """
    timestamp = str(int(time.time() if now is None else now))
    nonce = os.urandom(NONCE_BYTES).hex() if nonce is None else nonce
    message = canonical_request(method, path, body, timestamp, nonce)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(message)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        r, s = decode_dss_signature(private_key.sign(message, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        raise InvalidField("request keys are Ed25519 or P-256", field="private_key")
    return {
        HEADER_CLIENT: client_id,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii"),
    }


@dataclass(slots=True)
class _Pending:
    """A live request some of whose calls are not yet performed: its body and calls."""

    body_sha256: bytes
    calls: frozenset[str]
    performed: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Expiring:
    """The nonces that expire at one time: their digests, and their clients, in step."""

    digests: list[bytes] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)


class NonceTracker:
    """Nonces seen recently, each kept until its request's timestamp leaves the window.

    Bounded twice: when ``capacity`` nonces are live, or ``per_client`` of one client's,
    :meth:`remember` refuses that request instead of forgetting one early (forgetting early
    would reopen a replay). So one client cannot fill the tracker for all the others. Not
    locked by itself; :class:`RequestVerifier` serialises access.

    Compact: a live nonce is one 128-bit BLAKE2b digest of (client, nonce), keyed with a
    random secret of this tracker, held in a set and in the list of its expiry time: about
    a tenth of the memory of per-nonce records. Replays are caught exactly: a replay has the
    same client and nonce, so the same digest. A collision (unforeseeable without the key; a
    fresh request meets one of a million live digests with odds of 2**-108) could only refuse
    a fresh request. A request whose calls are not all performed keeps its body hash and
    calls too, until they are.
    """

    capacity: int
    per_client: int
    """The quota of live nonces of each client (``capacity`` when not given)."""

    def __init__(self, *, capacity: int, per_client: int | None = None) -> None:
        self.limit(capacity, capacity if per_client is None else per_client)
        self._digest_key = os.urandom(_DIGEST_KEY_BYTES)
        self._live: set[bytes] = set()
        self._pending: dict[bytes, _Pending] = {}
        self._expiring: dict[float, _Expiring] = {}
        """The nonces by when they expire (whole seconds for signed requests)."""
        self._expiry_order: list[float] = []
        """The keys of :attr:`_expiring`, a heap."""
        self._per_client_live: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._live)

    def limit(self, capacity: int, per_client: int) -> None:
        """Set the bounds (nonces live already stay, but count against them)."""
        if capacity < 1:
            raise ConfigurationError("nonce capacity must be at least 1")
        if not 1 <= per_client <= capacity:
            raise ConfigurationError("a client's nonce quota must be 1 to the nonce capacity")
        self.capacity = capacity
        self.per_client = per_client

    def live(self, client_id: str) -> int:
        """How many of ``client_id``'s nonces are live."""
        return self._per_client_live.get(client_id, 0)

    def remember(
        self,
        client_id: str,
        nonce: str,
        *,
        expires_at: float,
        now: float,
        body_sha256: bytes = b"",
        calls: Collection[str] | None = None,
        follow_up: bool = False,
    ) -> None:
        """Record a nonce; refuse one already live, or any when the tracker is full or the
        client has ``per_client`` nonces live.

        With ``calls`` (the request's call names), a live nonce is accepted again for the
        same body while some of its calls are not yet performed (:meth:`perform`), but only
        as a ``follow_up``: a presentation that goes on to perform some of them. Presented
        again for anything else (authentication alone), it is a replay, even if a call of
        it can never be performed (one the host refused, or with bad parameters).
        """
        self._expire(now)
        digest = self._digest(client_id, nonce)
        if digest in self._live:
            pending = self._pending.get(digest)
            if (
                pending is None
                or calls is None
                or not follow_up
                or pending.body_sha256 != body_sha256
            ):
                raise AccessDenied(f"nonce already used by client {client_id!r} (replayed request)")
            return
        if len(self._live) >= self.capacity:
            raise AccessDenied("too many recent requests to track their nonces; retry later")
        if self.live(client_id) >= self.per_client:
            raise AccessDenied(
                f"client {client_id!r} has too many requests in the time window (a quota of "
                f"{self.per_client} live nonces); retry once older ones expire"
            )
        self._live.add(digest)
        if calls:
            self._pending[digest] = _Pending(body_sha256, frozenset(calls))
        client_id = sys.intern(client_id)  # a registered id: one string, however many nonces
        self._per_client_live[client_id] = self.live(client_id) + 1
        expiring = self._expiring.get(expires_at)
        if expiring is None:
            self._expiring[expires_at] = expiring = _Expiring()
            heapq.heappush(self._expiry_order, expires_at)
        expiring.digests.append(digest)
        expiring.clients.append(client_id)

    def perform(self, client_id: str, nonce: str, calls: Collection[str], *, now: float) -> None:
        """Mark ``calls`` of a remembered request performed; refuse if any already was (or
        is not one of its calls, or the nonce has expired meanwhile)."""
        self._expire(now)
        digest = self._digest(client_id, nonce)
        wanted = set(calls)
        if digest not in self._live:
            raise AccessDenied(f"no such call in client {client_id!r}'s request")
        pending = self._pending.get(digest)
        if pending is None:  # all its calls are performed (or it had none)
            if wanted:
                raise AccessDenied(
                    f"no call left to perform in client {client_id!r}'s request (replayed request)"
                )
            return
        if not wanted <= pending.calls:
            raise AccessDenied(f"no such call in client {client_id!r}'s request")
        if not wanted.isdisjoint(pending.performed):
            raise AccessDenied(
                f"call already performed for client {client_id!r} (replayed request)"
            )
        pending.performed = pending.performed | wanted
        if pending.performed >= pending.calls:
            del self._pending[digest]

    def _digest(self, client_id: str, nonce: str) -> bytes:
        """The digest of a canonical (length-prefixed) encoding of ``(client_id, nonce)``."""
        client = client_id.encode()
        encoded = len(client).to_bytes(4, "big") + client + nonce.encode()
        return hashlib.blake2b(encoded, digest_size=_DIGEST_BYTES, key=self._digest_key).digest()

    def _expire(self, now: float) -> None:
        while self._expiry_order and self._expiry_order[0] < now:
            expiring = self._expiring.pop(heapq.heappop(self._expiry_order))
            for digest in expiring.digests:
                self._live.discard(digest)
                if self._pending:
                    self._pending.pop(digest, None)
            for client_id, expired in Counter(expiring.clients).items():
                left = self.live(client_id) - expired
                if left:
                    self._per_client_live[client_id] = left
                else:
                    del self._per_client_live[client_id]


@dataclass(frozen=True, slots=True)
class Presentation:
    """A signed request shown to :meth:`RequestVerifier.present`: who signed it, and its
    nonce, to :meth:`RequestVerifier.perform` its calls with."""

    principal: Principal
    nonce: str


class RequestVerifier:
    """Authenticates callers: request signatures (:meth:`verify`) and bearer tokens
    (:meth:`verify_bearer`), against the registry in force at each call.

    ``registry`` is a :class:`ClientsRegistry` or a holder whose ``current`` one is read
    per request, so a reload takes effect at once while the nonces seen are kept. ``now``
    is the clock in unix seconds, injectable for tests. ``not_before`` (default: the time of
    construction) refuses requests signed earlier, whose nonces this verifier cannot know.
    ``nonce_capacity`` bounds the nonces live at once, ``nonce_quota`` (default:
    :func:`default_nonce_quota`) those of one client.
    """

    def __init__(
        self,
        registry: ClientsRegistry | RegistrySource,
        *,
        window: int = DEFAULT_WINDOW,
        now: Callable[[], float] = time.time,
        nonce_capacity: int = DEFAULT_NONCE_CAPACITY,
        nonce_quota: int | None = None,
        not_before: float | None = None,
    ) -> None:
        if window < 1:
            raise ConfigurationError("the request window must be at least one second")
        self.window = window
        self.not_before = now() if not_before is None else not_before
        self._registry = registry
        self._now = now
        quota = default_nonce_quota(nonce_capacity) if nonce_quota is None else nonce_quota
        self._nonces = NonceTracker(capacity=nonce_capacity, per_client=quota)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RequestVerifier(window={self.window}, nonces={len(self._nonces)})"

    def limit_nonces(self, capacity: int, quota: int) -> None:
        """Bound the nonces live at once, and those of one client, anew (a reconfiguration)."""
        with self._lock:
            self._nonces.limit(capacity, quota)

    @property
    def registry(self) -> ClientsRegistry:
        source = self._registry
        return source if isinstance(source, ClientsRegistry) else source.current

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        registry: ClientsRegistry | None = None,
    ) -> Principal:
        """The principal that signed this request, or :class:`~signd.errors.AccessDenied`.

        Header names are matched case-insensitively. Checks run cheapest first; the nonce
        is only recorded once the signature verifies, so unauthenticated traffic cannot
        fill the nonce tracker or burn a client's nonces. ``registry``: the clients to
        verify against (one a gate call read with its policy), else those in force.
        """
        return self._verify(method, path, body, headers, None, registry=registry).principal

    def present(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        calls: Collection[str],
        *,
        follow_up: bool,
        registry: ClientsRegistry | None = None,
    ) -> Presentation:
        """Like :meth:`verify`, for a request whose ``calls`` (names) are performed one by
        one with :meth:`perform`: it may be presented again, as a ``follow_up`` that
        performs some of them, until all are performed."""
        return self._verify(
            method, path, body, headers, calls, follow_up=follow_up, registry=registry
        )

    def perform(self, presentation: Presentation, calls: Collection[str]) -> None:
        """Mark ``calls`` of a presented request performed; a call already performed (a
        replay) is :class:`~signd.errors.AccessDenied`."""
        with self._lock:
            self._nonces.perform(
                presentation.principal.client_id, presentation.nonce, calls, now=self._now()
            )

    def _verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        calls: Collection[str] | None,
        *,
        follow_up: bool = False,
        registry: ClientsRegistry | None = None,
    ) -> Presentation:
        fields = {name.lower(): value for name, value in headers.items()}
        client_id = _header(fields, HEADER_CLIENT)
        timestamp = _header(fields, HEADER_TIMESTAMP)
        nonce = _header(fields, HEADER_NONCE)
        signature_text = _header(fields, HEADER_SIGNATURE)
        client = (self.registry if registry is None else registry).get(client_id)
        if client is None:
            raise AccessDenied(f"unknown client {shown(client_id)}")
        if client.public_key is None:
            raise AccessDenied(f"client {client_id!r} authenticates with a bearer token only")
        try:
            message = canonical_request(method, path, body, timestamp, nonce)
        except InvalidField as exc:
            raise AccessDenied(f"malformed signed request: {exc.message}") from None
        now = self._now()
        signed_at = int(timestamp)
        if signed_at < now - self.window:
            raise AccessDenied(
                f"stale timestamp: signed {int(now - signed_at)} s ago, "
                f"more than the {self.window} s window"
            )
        if signed_at > now + self.window:
            raise AccessDenied(
                f"future timestamp: {int(signed_at - now)} s ahead, "
                f"more than the {self.window} s window"
            )
        if signed_at < self.not_before:
            raise AccessDenied("request signed before the enclave started; sign it again")
        signature = _decode_signature(signature_text)
        if not _verifies(client.public_key, signature, message):
            raise AccessDenied(f"request signature does not verify for client {client_id!r}")
        with self._lock:
            self._nonces.remember(
                client_id,
                nonce,
                expires_at=signed_at + self.window,
                now=now,
                body_sha256=hashlib.sha256(body).digest(),
                calls=calls,
                follow_up=follow_up,
            )
        return Presentation(client.principal("signature"), nonce)

    def verify_bearer(self, token: str, *, registry: ClientsRegistry | None = None) -> Principal:
        """The bearer client holding ``token`` (compared as SHA-256, in constant time), in
        ``registry`` (see :meth:`verify`)."""
        return (self.registry if registry is None else registry).verify_bearer(token)


def _header(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name.lower())
    if not isinstance(value, str) or not value:
        raise AccessDenied(f"missing header {name}")
    return value


def _decode_signature(text: str) -> bytes:
    if len(text) > _MAX_SIGNATURE_TEXT:
        raise AccessDenied(f"malformed signed request: {HEADER_SIGNATURE} is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AccessDenied(f"malformed signed request: {HEADER_SIGNATURE} is not base64") from None


def _verifies(
    key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey, signature: bytes, message: bytes
) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
            return True
        if len(signature) != _P256_SIGNATURE_BYTES:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False
