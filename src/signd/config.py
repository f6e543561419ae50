"""Settings: frozen, validated, from CLI > environment > file > embedded defaults.

Secrets (passphrases, PINs) are never settings values: settings name where a secret comes
from, and :mod:`signd.secrets` fetches it, wrapped in :class:`signd.crypto.secret.Secret`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signd.errors import ConfigurationError

HOME_ENV = "SIGND_HOME"
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


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None


def load_settings(home: Path | None = None) -> Settings:
    """Build settings from ``home`` (or SIGND_HOME, or ~/.signd) and its signd.toml."""
    home = (home or default_home()).expanduser()
    raw = _read_config_file(home / CONFIG_FILE_NAME)
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
