"""Settings: frozen, validated, from CLI > environment > file > embedded defaults.

Secrets (passphrases, PINs) are never settings values: settings name where a secret comes
from, and :mod:`signd.secrets` fetches it, wrapped in :class:`signd.crypto.secret.Secret`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from signd.errors import ConfigurationError
from signd.secrets import EnvSecrets, parse_secret_ref

HOME_ENV = "SIGND_HOME"
SECTIONS = ("custody", "enclave", "kms", "blobs", "metadata", "hsm", "proxy", "api", "kms_custody")
"""Config file tables that environment variables ``SIGND_<SECTION>_<KEY>`` may override."""
_SECRET_KEYS = frozenset({"pin", "passphrase", "password", "secret_access_key"})
CONFIG_FILE_NAME = "signd.toml"
KEYSTORE_FILE_NAME = "wallet.data"


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".signd")


@dataclass(frozen=True, slots=True)
class KeystoreSettings:
    """Where Wallet.data lives and how its passphrase is obtained."""

    path: Path
    passphrase_file: Path | None = None
    scrypt_n: int = 2**17


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything signd needs to start; built once, never mutated."""

    home: Path
    keystore: KeystoreSettings
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """The parsed config file, for sections owned by later components."""

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_FILE_NAME

    def section(self, name: str) -> dict[str, Any]:
        """A config table with its environment overrides applied (empty when absent)."""
        table = self.raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigurationError(f"[{name}] must be a table in {self.config_file}")
        return dict(table)

    def environment_secret_references(self) -> dict[str, str]:
        """The environment variable each ``env:NAME`` secret reference in the config file
        names, by setting (``{"hsm.pin": "NAME"}``); a malformed reference is left to the
        component that reads it."""
        return dict(_env_references(self.raw, ""))

    def overriding(self, name: str, **values: Any) -> Settings:
        """These settings with ``[name]``'s ``values`` set (for what a command decides)."""
        return dataclasses.replace(self, raw={**self.raw, name: {**self.section(name), **values}})


def _env_references(table: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, str]]:
    for key, value in table.items():
        setting = f"{prefix}{key}"
        if key in _SECRET_KEYS:
            try:
                reference = parse_secret_ref(value)
            except ConfigurationError:
                continue
            if reference.provider == EnvSecrets.scheme:
                yield setting, reference.name
        elif isinstance(value, Mapping):
            yield from _env_references(value, f"{setting}.")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None


def _env_value(text: str) -> Any:
    """An environment value read as a TOML value when it is one (5, 2.5, true, [..]), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def override_target(variable: str) -> tuple[str, str] | None:
    """The ``(section, key)`` that ``variable`` (``SIGND_<SECTION>_<KEY>``) overrides, or
    ``None`` (not such a variable, or a secret key's, which never come from the environment).
    A variable belongs to the longest section name it starts with: ``SIGND_KMS_CUSTODY_*`` is
    ``kms_custody``'s, not ``kms``'s."""
    owners = [
        section
        for section in SECTIONS
        if variable.startswith(prefix := f"SIGND_{section.upper()}_")
        and len(variable) > len(prefix)
    ]
    if not owners:
        return None
    owner = max(owners, key=len)
    key = variable[len(f"SIGND_{owner.upper()}_") :].lower()
    return None if key in _SECRET_KEYS else (owner, key)


def override_variables(sections: Collection[str], environ: Mapping[str, str]) -> set[str]:
    """The variables of ``environ`` that override a setting of one of ``sections``
    (:func:`override_target`, as :func:`apply_environment` reads them)."""
    return {
        variable
        for variable in environ
        if (target := override_target(variable)) is not None and target[0] in sections
    }


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``SIGND_<SECTION>_<KEY>=value`` onto ``[section] key`` (:func:`override_target`;
    secrets excluded)."""
    merged = {
        name: dict(table) if isinstance(table, dict) else table for name, table in raw.items()
    }
    for variable, text in environ.items():
        target = override_target(variable)
        if target is not None:
            section, key = target
            table = merged.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = _env_value(text)
    return merged


def config_number(
    table: str, section: Mapping[str, Any], key: str, default: float, *, allow_zero: bool = False
) -> float:
    """``[table] key``: a positive number (or, with ``allow_zero``, a non-negative one, where 0
    usually turns something off), else a ConfigurationError naming it."""
    value = section.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        wanted = "a non-negative" if allow_zero else "a positive"
        raise ConfigurationError(f"{table}.{key} must be {wanted} number", field=f"{table}.{key}")
    return float(value)


def config_flag(table: str, section: Mapping[str, Any], key: str, default: bool) -> bool:
    """``[table] key``: true or false, else a ConfigurationError naming it."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{table}.{key} must be true or false", field=f"{table}.{key}")
    return value


def expand_home(value: str, home: Path) -> str:
    """Replace ``{home}`` in a configured path or address."""
    return value.replace("{home}", str(home))


def load_settings(home: Path | None = None) -> Settings:
    """Build settings from ``home`` (or SIGND_HOME, or ~/.signd), its signd.toml and env."""
    home = (home or default_home()).expanduser()
    raw = apply_environment(_read_config_file(home / CONFIG_FILE_NAME), os.environ)
    section = raw.get("keystore", {})
    if not isinstance(section, dict):
        raise ConfigurationError("[keystore] must be a table")
    path = Path(section.get("path", home / KEYSTORE_FILE_NAME)).expanduser()
    passphrase_file = section.get("passphrase_file") or os.environ.get(
        "SIGND_KEYSTORE_PASSPHRASE_FILE"
    )
    scrypt_n = section.get("scrypt_n", 2**17)
    if not isinstance(scrypt_n, int) or scrypt_n < 2**10 or scrypt_n & (scrypt_n - 1):
        raise ConfigurationError("keystore.scrypt_n must be a power of two of at least 1024")
    return Settings(
        home=home,
        keystore=KeystoreSettings(
            path=path,
            passphrase_file=Path(passphrase_file).expanduser() if passphrase_file else None,
            scrypt_n=scrypt_n,
        ),
        raw=raw,
    )


ATTESTATION_MODES: Final = ("simulated", "nsm", "off")


def attestation_mode(settings: Settings) -> str:
    """``[enclave] attestation``: ``simulated`` (the local default), ``nsm`` or ``off``."""
    mode = settings.section("enclave").get("attestation", "simulated")
    if mode not in ATTESTATION_MODES:
        raise ConfigurationError(
            f"enclave.attestation must be one of {', '.join(ATTESTATION_MODES)}",
            field="enclave.attestation",
        )
    return str(mode)
