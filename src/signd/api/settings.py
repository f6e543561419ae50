"""The service's settings: the ``[api]`` table of ``signd.toml``, overridden by ``signd serve``.

Frozen and validated once at start-up; an unknown or mistyped setting is a
:class:`~signd.errors.ConfigurationError` then, never at first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from signd.errors import ConfigurationError

DEFAULT_PORT = 8645


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the REST and JSON-RPC service behaves."""

    allow_blind_signing: bool = False
    """Serve ``POST /v1/sign/hash`` (signing an opaque 32-byte digest). Off unless asked for."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies are refused with 413."""
    max_batch: int = 100
    """Most requests in one ``POST /v1/sign/batch`` or one JSON-RPC batch."""
    max_keys_per_request: int = 1000
    """Most keys one ``POST /v1/keys`` creates."""
    signing_threads: int = 8
    """Blocking custody calls run in a thread pool this wide."""
    health_timeout: float = 5.0
    """Seconds ``/readyz`` waits for one backend's health check."""
    downstream: str | None = None
    """An Ethereum node's JSON-RPC URL: unknown methods are proxied to it and
    ``eth_sendTransaction`` fills nonce, gas, fees and chain id from it."""
    downstream_timeout: float = 10.0
    chain_id: int | None = None
    """What ``eth_chainId`` answers; without it, the downstream node's chain id."""
    accounts: tuple[str, ...] = ()
    """What ``eth_accounts`` lists (addresses or key ids); empty: see ``accounts_label``."""
    accounts_label: str | None = None
    """With no ``accounts``: list Ethereum keys with this label (all of them when unset)."""
    max_accounts: int = 1000
    """Most addresses ``eth_accounts`` lists when it lists keys by label or all of them."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_batch", "max_keys_per_request", "signing_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"api.{name} must be a positive integer", field="api")
        for name in ("health_timeout", "downstream_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"api.{name} must be a positive number", field="api")
        if self.downstream is not None and not self.downstream.startswith(("http://", "https://")):
            raise ConfigurationError("api.downstream must be an http(s) URL", field="api")
        if self.chain_id is not None and (
            isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int)
        ):
            raise ConfigurationError("api.chain_id must be an integer", field="api")
        if not isinstance(self.allow_blind_signing, bool):
            raise ConfigurationError("api.allow_blind_signing must be true or false", field="api")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], **overrides: Any) -> ApiSettings:
        """Settings from an ``[api]`` table, then ``overrides`` (``None`` values ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown settings in [api]: {', '.join(unknown)}", field="api"
            )
        values = dict(table)
        values.update({name: value for name, value in overrides.items() if value is not None})
        accounts = values.get("accounts", ())
        if not isinstance(accounts, list | tuple) or not all(isinstance(a, str) for a in accounts):
            raise ConfigurationError("api.accounts must be a list of strings", field="api")
        values["accounts"] = tuple(accounts)
        return cls(**values)
