"""The custody registry: one dict maps a custody ``type`` tag to a factory.

An unknown tag in the configuration is an error at start-up, never at first use.
"""

from __future__ import annotations

from collections.abc import Callable

from signd.config import Settings
from signd.crypto.secret import Secret
from signd.custody.base import CustodyBackend
from signd.custody.keystore import KeystoreBackend, ScryptParams
from signd.errors import ConfigurationError
from signd.operations.signer import BackendFactory, Signer
from signd.secrets import resolve_secret

KEYSTORE_PASSPHRASE_ENV = "SIGND_KEYSTORE_PASSPHRASE"  # noqa: S105 - a variable name

PassphraseSource = Callable[[bool], Secret]
"""Returns the keystore passphrase; the flag says whether the keystore is being created."""


def keystore_passphrase_source(settings: Settings) -> PassphraseSource:
    def source(creating: bool) -> Secret:
        return resolve_secret(
            what="keystore passphrase",
            env_var=KEYSTORE_PASSPHRASE_ENV,
            file=settings.keystore.passphrase_file,
            confirm=creating,
        )

    return source


def _keystore_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_keystore() -> CustodyBackend:
        path = settings.keystore.path
        creating = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return KeystoreBackend.open(
            path,
            passphrase(creating),
            create=True,
            kdf_params=ScryptParams(n=settings.keystore.scrypt_n) if creating else None,
        )

    return open_keystore


CUSTODY_REGISTRY: dict[str, Callable[[Settings, PassphraseSource], BackendFactory]] = {
    "keystore": _keystore_factory,
}


def build_signer(settings: Settings, passphrase: PassphraseSource | None = None) -> Signer:
    """A signer with every custody the settings enable (the keystore always)."""
    enabled = settings.raw.get("custody", {}).get("enabled", ["keystore"])
    unknown = [tag for tag in enabled if tag not in CUSTODY_REGISTRY]
    if unknown:
        raise ConfigurationError(
            f"unknown custody type(s) {unknown}; known: {sorted(CUSTODY_REGISTRY)}"
        )
    source = passphrase or keystore_passphrase_source(settings)
    return Signer({tag: CUSTODY_REGISTRY[tag](settings, source) for tag in enabled})
