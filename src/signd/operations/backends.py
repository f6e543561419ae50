"""The custody registry: one dict maps a custody ``type`` tag to a factory.

An unknown tag in the configuration is an error at start-up, never at first use.
"""

from __future__ import annotations

from collections.abc import Callable

from signd.config import Settings
from signd.crypto.secret import Secret
from signd.custody.base import CustodyBackend
from signd.custody.enclave import EnclaveBackend
from signd.custody.keystore import KeystoreBackend, ScryptParams
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import transport_for
from signd.errors import ConfigurationError
from signd.operations.components import build_metadata_store
from signd.operations.local_enclave import LocalEnclaveTransport
from signd.operations.signer import BackendFactory, Signer
from signd.secrets import resolve_secret
from signd.storage.base import MetadataStore

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


class _OwningEnclaveBackend(EnclaveBackend):
    """An enclave backend that also owns its metadata store and (local) enclave process."""

    def __init__(
        self,
        client: EnclaveClient,
        metadata: MetadataStore,
        local: LocalEnclaveTransport | None,
    ) -> None:
        super().__init__(client, metadata)
        self._owned_metadata = metadata
        self._local = local

    def close(self) -> None:
        super().close()
        self._owned_metadata.close()
        if self._local is not None:
            self._local.stop()


def _enclave_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_enclave() -> CustodyBackend:
        section = settings.section("enclave")
        address = section.get("transport")
        local = None if address else LocalEnclaveTransport(settings.home)
        transport = local if local is not None else transport_for(str(address))
        timeout = float(section.get("timeout", 10.0))
        metadata = build_metadata_store(settings)
        return _OwningEnclaveBackend(EnclaveClient(transport, timeout=timeout), metadata, local)

    return open_enclave


def _hsm_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_hsm() -> CustodyBackend:
        from signd.custody.hsm import HsmBackend, HsmSettings  # pkcs11 only when configured

        class OwningHsmBackend(HsmBackend):
            """An HSM backend that also owns its metadata store."""

            def close(self) -> None:
                super().close()
                metadata.close()

        hsm_settings = HsmSettings.from_mapping(settings.section("hsm"))
        metadata = build_metadata_store(settings)
        try:
            return OwningHsmBackend(hsm_settings, metadata)
        except BaseException:
            metadata.close()
            raise

    return open_hsm


CUSTODY_REGISTRY: dict[str, Callable[[Settings, PassphraseSource], BackendFactory]] = {
    "enclave": _enclave_factory,
    "hsm": _hsm_factory,
    "keystore": _keystore_factory,
}


def default_custody(settings: Settings) -> list[str]:
    """Enabled custody types, in key-lookup order: those whose lookups need no secret first.

    The HSM joins when it is configured (an ``[hsm]`` table or ``SIGND_HSM_MODULE``).
    """
    hsm = ["hsm"] if settings.section("hsm") else []
    return ["enclave", *hsm, "keystore"]


def build_signer(settings: Settings, passphrase: PassphraseSource | None = None) -> Signer:
    """A signer with every custody the settings enable (the keystore always)."""
    enabled = settings.section("custody").get("enabled") or default_custody(settings)
    if not isinstance(enabled, list) or not all(isinstance(tag, str) for tag in enabled):
        raise ConfigurationError("custody.enabled must be a list of custody types")
    unknown = [tag for tag in enabled if tag not in CUSTODY_REGISTRY]
    if unknown:
        raise ConfigurationError(
            f"unknown custody type(s) {unknown}; known: {sorted(CUSTODY_REGISTRY)}"
        )
    source = passphrase or keystore_passphrase_source(settings)
    return Signer({tag: CUSTODY_REGISTRY[tag](settings, source) for tag in enabled})
