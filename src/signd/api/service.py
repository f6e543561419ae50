"""The service between the wire and :class:`~signd.operations.Signer`.

Every request goes through the same steps: the caller is turned into a :class:`Principal`
(the authentication seam), the :class:`SigningGate` is consulted (the policy seam), and the
blocking custody call runs in a bounded thread pool. REST and JSON-RPC share this class, so
they cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

from signd.api.errors import BlindSigningDisabled, wire_error
from signd.api.metrics import ApiMetrics
from signd.api.settings import ApiSettings
from signd.chains.ethereum import SignedTransaction
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import KeyInfo, KeyPage
from signd.errors import DependencyUnavailable
from signd.operations import Signer
from signd.operations.signer import MessageSignature

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Until client authentication exists, everyone is ``anonymous``."""

    name: str


ANONYMOUS = Principal("anonymous")

Authenticator = Callable[[Request], Awaitable[Principal]]
"""Turns a request into its principal, or raises :class:`~signd.errors.AccessDenied`."""


async def anonymous(request: Request) -> Principal:
    """The default authenticator: no authentication, every caller is the same principal."""
    return ANONYMOUS


class SigningKind(enum.StrEnum):
    """What a signing request asks for; also the ``type`` of a batch item."""

    HASH = "hash"
    ETH_TRANSACTION = "ethereum/transaction"
    ETH_MESSAGE = "ethereum/message"
    ETH_TYPED_DATA = "ethereum/typed-data"


class SigningGate(Protocol):
    """Consulted before every signature; raises :class:`~signd.errors.AccessDenied` to refuse.

    This is the host side's seam for policy: it sees who asks, for what and with which key
    (as the caller named it), before any key is looked up.
    """

    def authorize(self, principal: Principal, kind: SigningKind, key: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ServerGate:
    """The default gate: server-wide switches only. Blind signing is refused unless enabled."""

    allow_blind_signing: bool = False

    def authorize(self, principal: Principal, kind: SigningKind, key: str) -> None:
        if kind is SigningKind.HASH and not self.allow_blind_signing:
            raise BlindSigningDisabled()


class SigningService:
    """Keys and signatures for the API, off the event loop and counted in the metrics."""

    def __init__(
        self,
        signer: Signer,
        settings: ApiSettings,
        metrics: ApiMetrics,
        gate: SigningGate | None = None,
    ) -> None:
        self.signer = signer
        self.settings = settings
        self.metrics = metrics
        self.gate: SigningGate = gate or ServerGate(settings.allow_blind_signing)
        self._limiter: anyio.CapacityLimiter | None = None

    def reset(self) -> None:
        """Forget the thread limiter (it belongs to the event loop that created it)."""
        self._limiter = None

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in the bounded thread pool."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.signing_threads)
        return await anyio.to_thread.run_sync(
            partial(function, *args, **kwargs), limiter=self._limiter
        )

    # keys

    async def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        return await self.run(
            self.signer.create_keys, chain=chain, custody=custody, count=count, labels=labels
        )

    async def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        return await self.run(self.signer.get_key, ref)

    async def list_keys(
        self,
        principal: Principal,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage:
        return await self.run(
            self.signer.list_keys,
            custody=custody,
            chain=chain,
            label=label,
            cursor=cursor,
            limit=limit,
        )

    async def ethereum_accounts(self, principal: Principal) -> list[str]:
        """The addresses ``eth_accounts`` lists: configured ones, or keys by label, or all."""
        return await self.run(self._ethereum_accounts)

    def _ethereum_accounts(self) -> list[str]:
        if self.settings.accounts:
            return [self.signer.get_key(ref).address for ref in self.settings.accounts]
        addresses: list[str] = []
        for custody in self.signer.custody_types:
            cursor: str | None = None
            while len(addresses) < self.settings.max_accounts:
                page = self.signer.list_keys(
                    custody=custody,
                    chain="ethereum",
                    label=self.settings.accounts_label,
                    cursor=cursor,
                    limit=min(1000, self.settings.max_accounts - len(addresses)),
                )
                addresses.extend(key.address for key in page.keys)
                cursor = page.next_cursor
                if cursor is None:
                    break
        return addresses

    # signatures

    async def _sign(
        self, principal: Principal, kind: SigningKind, key: str, sign: Callable[[KeyInfo], T]
    ) -> T:
        self.gate.authorize(principal, kind, key)

        def resolve_and_sign() -> tuple[KeyInfo, T]:
            info = self.signer.get_key(key)
            return info, sign(info)

        info, result = await self.run(resolve_and_sign)
        self.metrics.signatures.inc(info.chain, info.custody, kind.value)
        return result

    async def sign_hash(
        self, principal: Principal, key: str, digest: bytes
    ) -> RecoverableSignature:
        return await self._sign(
            principal, SigningKind.HASH, key, lambda ref: self.signer.sign_hash(ref, digest)
        )

    async def sign_eth_transaction(
        self, principal: Principal, key: str, transaction: Mapping[str, Any]
    ) -> SignedTransaction:
        return await self._sign(
            principal,
            SigningKind.ETH_TRANSACTION,
            key,
            lambda ref: self.signer.sign_eth_transaction(ref, transaction),
        )

    async def sign_eth_message(
        self, principal: Principal, key: str, message: bytes
    ) -> MessageSignature:
        return await self._sign(
            principal,
            SigningKind.ETH_MESSAGE,
            key,
            lambda ref: self.signer.sign_eth_message(ref, message),
        )

    async def sign_eth_typed_data(
        self, principal: Principal, key: str, document: Mapping[str, Any]
    ) -> MessageSignature:
        return await self._sign(
            principal,
            SigningKind.ETH_TYPED_DATA,
            key,
            lambda ref: self.signer.sign_eth_typed_data(ref, document),
        )

    # health

    async def readiness(self) -> list[dict[str, str]]:
        """One entry per configured custody: ``ok``, or ``unavailable`` with the reason."""
        parts = []
        for custody in self.signer.custody_types:
            part = {"part": f"custody:{custody}", "status": "ok"}
            try:
                with anyio.fail_after(self.settings.health_timeout):
                    await anyio.to_thread.run_sync(
                        self._check_custody, custody, abandon_on_cancel=True
                    )
            except TimeoutError:
                part |= {
                    "status": "unavailable",
                    "code": DependencyUnavailable.code,
                    "message": f"no answer in {self.settings.health_timeout:g}s",
                }
            except Exception as exc:
                body = wire_error(exc).body
                part |= {"status": "unavailable", "code": body["code"], "message": body["message"]}
            parts.append(part)
        return parts

    def _check_custody(self, custody: str) -> None:
        self.signer.backend(custody).check_health()
