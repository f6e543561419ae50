"""How signd reaches a PKCS#11 token: module, token, PIN and session pool size."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from signd.crypto.secret import Secret
from signd.errors import ConfigurationError
from signd.secrets import HSM_PIN_ENV, resolve_reference

ENV_MODULE = "SIGND_HSM_MODULE"
ENV_TOKEN_LABEL = "SIGND_HSM_TOKEN_LABEL"  # noqa: S105 - a variable name
ENV_PIN = HSM_PIN_ENV
ENV_IN_ENCLAVE = "SIGND_HSM_IN_ENCLAVE"

_KNOWN_KEYS = frozenset(
    {
        "module",
        "token_label",
        "slot",
        "pin",
        "pool_size",
        "acquire_timeout",
        "reconnect_interval",
        "key_label_prefix",
        "in_enclave",
    }
)


@dataclass(frozen=True, slots=True)
class HsmSettings:
    """Frozen HSM settings; ``pin`` prints as a mask.

    Exactly one of ``token_label`` and ``slot`` (a PKCS#11 slot id) picks the token.
    """

    module_path: Path
    pin: Secret
    token_label: str | None = None
    slot: int | None = None
    pool_size: int = 4
    """Logged-in sessions kept open; at most this many signatures run at once."""
    acquire_timeout: float = 30.0
    """Seconds a request waits for a free session before DependencyUnavailable."""
    reconnect_interval: float = 1.0
    """While the token is unreachable, seconds between reconnection attempts."""
    key_label_prefix: str = "signd"
    """CKA_LABEL of created keys is ``{prefix}-{key_id}``."""

    def __post_init__(self) -> None:
        _check_fields(
            self.token_label,
            self.slot,
            self.pool_size,
            self.acquire_timeout,
            self.reconnect_interval,
            self.key_label_prefix,
        )
        if not isinstance(self.pin, Secret) or not self.pin:
            raise ConfigurationError("hsm: a non-empty PIN is required")

    @property
    def token_description(self) -> str:
        """How the token is named in messages."""
        return (
            f"label {self.token_label!r}" if self.token_label is not None else f"slot {self.slot}"
        )

    @classmethod
    def from_mapping(
        cls,
        section: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        *,
        resolve: Callable[[Any], Secret] = resolve_reference,
    ) -> HsmSettings:
        """Settings from a config ``[hsm]`` table, with ``SIGND_HSM_*`` variables overriding it.

        ``pin`` in the table is a secret reference (``env:NAME``, ``file:/path``,
        ``aws-sm:id#field``), never the PIN itself; ``SIGND_HSM_PIN`` holds the PIN directly.
        """
        env = os.environ if env is None else env
        unknown = set(section) - _KNOWN_KEYS
        if unknown:
            raise ConfigurationError(f"unknown [hsm] settings: {sorted(unknown)}")
        module = env.get(ENV_MODULE) or section.get("module")
        if not isinstance(module, str) or not module:
            raise ConfigurationError(f"hsm: no PKCS#11 module; set hsm.module or {ENV_MODULE}")
        token_label = env.get(ENV_TOKEN_LABEL) or section.get("token_label")
        slot = None if env.get(ENV_TOKEN_LABEL) else section.get("slot")
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
            raise ConfigurationError("hsm.slot must be an integer slot id")
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        tuning = {key: section.get(key, defaults[key]) for key in _TUNING_KEYS}
        label = token_label if isinstance(token_label, str) else None
        _check_fields(label, slot, *tuning.values())
        if env.get(ENV_PIN):
            pin = Secret(env[ENV_PIN])
        elif section.get("pin") is not None:
            pin = resolve(section["pin"])
        else:
            raise ConfigurationError(
                f"hsm: no PIN; set hsm.pin to a secret reference or set {ENV_PIN}"
            )
        return cls(
            module_path=Path(module).expanduser(),
            pin=pin,
            token_label=label,
            slot=slot,
            **tuning,
        )


def hsm_in_enclave(section: Mapping[str, Any], env: Mapping[str, str] | None = None) -> bool:
    """Whether ``[hsm] in_enclave`` (or ``SIGND_HSM_IN_ENCLAVE``) moves the HSM into the enclave.

    Then ``signd enclave`` loads the PKCS#11 module and fetches the PIN, and the host only
    talks to the enclave: it reads nothing else from ``[hsm]``.
    """
    env = os.environ if env is None else env
    value: Any = section.get("in_enclave", False)
    if env.get(ENV_IN_ENCLAVE):
        value = env[ENV_IN_ENCLAVE].strip().lower()
        if value not in ("true", "false", "1", "0"):
            raise ConfigurationError(f"{ENV_IN_ENCLAVE} must be true or false")
        value = value in ("true", "1")
    if not isinstance(value, bool):
        raise ConfigurationError("hsm.in_enclave must be true or false")
    return value


_TUNING_KEYS = ("pool_size", "acquire_timeout", "reconnect_interval", "key_label_prefix")


def _check_fields(
    token_label: str | None,
    slot: int | None,
    pool_size: Any,
    acquire_timeout: Any,
    reconnect_interval: Any,
    key_label_prefix: Any,
) -> None:
    """Validate everything but the PIN (checked before the PIN is fetched)."""
    if (token_label is None) == (slot is None):
        raise ConfigurationError("hsm: set exactly one of token_label and slot")
    if token_label is not None and not token_label.strip():
        raise ConfigurationError("hsm.token_label must not be empty")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 1 <= pool_size <= 256:
        raise ConfigurationError("hsm.pool_size must be an integer from 1 to 256")
    for name, value in (
        ("acquire_timeout", acquire_timeout),
        ("reconnect_interval", reconnect_interval),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(f"hsm.{name} must be a number of seconds")
    if acquire_timeout <= 0 or reconnect_interval < 0:
        raise ConfigurationError(
            "hsm.acquire_timeout must be positive and hsm.reconnect_interval not negative"
        )
    if (
        not isinstance(key_label_prefix, str)
        or not key_label_prefix
        or not key_label_prefix.isprintable()
    ):
        raise ConfigurationError("hsm.key_label_prefix must be printable text")
