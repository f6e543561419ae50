"""The custody registry: one dict maps a custody ``type`` tag to a factory.

An unknown tag in the configuration is an error at start-up, never at first use.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import ClassVar, Final

from signd.config import Settings, config_flag, config_number
from signd.crypto.secret import Secret
from signd.custody.base import CustodyBackend
from signd.custody.enclave import EnclaveBackend, EnclaveHsmBackend
from signd.custody.hsm.settings import HsmSettings, hsm_in_enclave
from signd.custody.keystore import KeystoreBackend, ScryptParams
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import transport_for
from signd.errors import ConfigurationError
from signd.operations.components import build_metadata_store
from signd.operations.local_enclave import HANG_TIMEOUT, EnclaveEnvironment, LocalEnclaveTransport
from signd.operations.signer import BackendFactory, Signer
from signd.secrets import (
    KEYSTORE_PASSPHRASE_ENV,
    AwsSecretsManager,
    parse_secret_ref,
    resolve_secret,
)
from signd.storage.base import MetadataStore

PassphraseSource = Callable[[bool], Secret]
"""Returns the keystore passphrase; the flag says whether the keystore is being created."""


def keystore_passphrase_source(
    settings: Settings, *, take_from_environment: bool = False
) -> PassphraseSource:
    """The keystore passphrase from ``SIGND_KEYSTORE_PASSPHRASE``, else the configured file,
    else a prompt.

    With ``take_from_environment`` (a service, which runs on and starts processes), a
    passphrase read from the variable is removed from ``os.environ`` and kept by the source
    for the keystore's next opening: processes started later and this one's ``os.environ`` no
    longer carry it. The copy the kernel took at exec stays in ``/proc/<pid>/environ``.
    """
    taken: Secret | None = None

    def source(creating: bool) -> Secret:
        nonlocal taken
        if taken is not None:
            return taken
        passphrase = resolve_secret(
            what="keystore passphrase",
            env_var=KEYSTORE_PASSPHRASE_ENV,
            file=settings.keystore.passphrase_file,
            confirm=creating,
        )
        if take_from_environment and os.environ.pop(KEYSTORE_PASSPHRASE_ENV, ""):
            taken = passphrase
        return passphrase

    return source


def keystore_passphrase_available(settings: Settings) -> bool:
    """Whether a keystore passphrase can be had without failing: the variable, a configured
    file, or a terminal to prompt in."""
    return bool(
        os.environ.get(KEYSTORE_PASSPHRASE_ENV)
        or settings.keystore.passphrase_file is not None
        or sys.stdin.isatty()
    )


def _keystore_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_keystore() -> CustodyBackend:
        """The keystore, checked against the metadata store's record of its path: a missing
        keystore whose keys are recorded is refused, not created (asked again on each use,
        so it opens once the file is back)."""
        metadata = build_metadata_store(settings)
        try:
            return KeystoreBackend.open(
                settings.keystore.path,
                passphrase,
                create=True,
                kdf_params=ScryptParams(n=settings.keystore.scrypt_n),
                metadata=metadata,
            )
        except BaseException:
            metadata.close()
            raise

    return open_keystore


ENCLAVE_TIMEOUT: Final = 15.0
"""Default seconds the host waits for the enclave's answer to one request. Longer than the
enclave's own worst case with the default dependency timeouts (a blob read, then a KMS
Decrypt, each with its retries: about 12 s), so that a stuck dependency is answered by the
enclave, as a 503 naming it and with its audit records, rather than by the host giving up
on the request, which the enclave may then still complete for no one."""


def enclave_environment(settings: Settings) -> EnclaveEnvironment:
    """What of this process's environment a local enclave started for ``settings`` gets."""
    hsm = settings.section("hsm")
    holds_hsm = bool(hsm) and hsm_in_enclave(hsm)
    passed = settings.section("enclave").get("pass_environment", [])
    if not isinstance(passed, list) or not all(isinstance(name, str) and name for name in passed):
        raise ConfigurationError(
            "enclave.pass_environment must be a list of variable names",
            field="enclave.pass_environment",
        )
    return EnclaveEnvironment(
        hsm_in_enclave=holds_hsm,
        uses_aws=_enclave_uses_aws(settings, holds_hsm),
        secret_references=settings.environment_secret_references(),
        passed=frozenset(passed),
    )


def _enclave_uses_aws(settings: Settings, holds_hsm: bool) -> bool:
    """Whether the enclave reaches AWS with boto3's default credentials and configuration:
    ``[kms] type = "aws"``, ``[blobs] type = "s3"`` or, holding the HSM, an ``aws-sm:`` PIN.
    (The embedded kms-server's client is given its endpoint and credentials.)"""
    if (
        settings.section("kms").get("type") == "aws"
        or settings.section("blobs").get("type") == "s3"
    ):
        return True
    pin = settings.section("hsm").get("pin")
    if not holds_hsm or pin is None:
        return False
    try:
        return parse_secret_ref(pin).provider == AwsSecretsManager.scheme
    except ConfigurationError:
        return False  # the enclave reports it


class _SharedEnclave:
    """One enclave client (and, locally, one enclave process) for every custody it serves.

    Sealed-key custody and an in-enclave HSM talk to the same enclave; each backend holds a
    reference, and the last one to close stops the local enclave.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _open: ClassVar[dict[int, _SharedEnclave]] = {}

    def __init__(self, settings: Settings) -> None:
        section = settings.section("enclave")
        address = section.get("transport")
        timeout = config_number("enclave", section, "timeout", ENCLAVE_TIMEOUT)
        hang_timeout = config_number(
            "enclave", section, "hang_timeout", HANG_TIMEOUT, allow_zero=True
        )
        gate_only = config_flag("enclave", section, "gate_only", False)
        self.local = (
            None
            if address
            else LocalEnclaveTransport(
                settings.home,
                hang_timeout=hang_timeout,
                gate_only=gate_only,
                environment=enclave_environment(settings),
            )
        )
        transport = self.local if self.local is not None else transport_for(str(address))
        self.client = EnclaveClient(transport, timeout=timeout)
        self._key = id(settings)
        self._users = 0

    @classmethod
    def acquire(cls, settings: Settings) -> _SharedEnclave:
        with cls._lock:
            shared = cls._open.get(id(settings))
            if shared is None:
                shared = cls._open[id(settings)] = cls(settings)
            shared._users += 1
            return shared

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            del self._open[self._key]
        self.client.close()
        if self.local is not None:
            self.local.stop()


class _EnclaveShare:
    """A backend's hold on a shared enclave and on its own metadata store; closes once."""

    def __init__(self, shared: _SharedEnclave, metadata: MetadataStore) -> None:
        self.shared = shared
        self._metadata: MetadataStore | None = metadata

    def close(self) -> None:
        metadata, self._metadata = self._metadata, None
        if metadata is not None:
            metadata.close()
            self.shared.release()


class _OwningEnclaveBackend(EnclaveBackend):
    """An enclave backend that also owns its metadata store and its share of the enclave."""

    def __init__(self, shared: _SharedEnclave, metadata: MetadataStore) -> None:
        super().__init__(shared.client, metadata)
        self._share = _EnclaveShare(shared, metadata)

    def close(self) -> None:
        self._share.close()


class _OwningEnclaveHsmBackend(EnclaveHsmBackend):
    """An in-enclave HSM backend that also owns its metadata store and its share of the enclave."""

    def __init__(self, shared: _SharedEnclave, metadata: MetadataStore) -> None:
        super().__init__(shared.client, metadata)
        self._share = _EnclaveShare(shared, metadata)

    def close(self) -> None:
        self._share.close()


def _enclave_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_enclave() -> CustodyBackend:
        metadata = build_metadata_store(settings)
        return _OwningEnclaveBackend(_SharedEnclave.acquire(settings), metadata)

    return open_enclave


def _hsm_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_hsm() -> CustodyBackend:
        section = settings.section("hsm")
        if hsm_in_enclave(section):
            # the enclave loads the module and fetches the PIN; the host reads neither
            metadata = build_metadata_store(settings)
            return _OwningEnclaveHsmBackend(_SharedEnclave.acquire(settings), metadata)

        from signd.custody.hsm import HsmBackend  # pkcs11 only when the host drives the HSM

        hsm_settings = HsmSettings.from_mapping(section)
        metadata = build_metadata_store(settings)
        try:
            return HsmBackend(hsm_settings, metadata).own_metadata()
        except BaseException:
            metadata.close()
            raise

    return open_hsm


def _kms_factory(settings: Settings, passphrase: PassphraseSource) -> BackendFactory:
    def open_kms() -> CustodyBackend:
        from signd.custody.kms import kms_backend_from_settings  # boto3 only when configured

        metadata = build_metadata_store(settings)
        try:
            backend = kms_backend_from_settings(
                settings.section("kms_custody"), metadata, settings.home
            )
        except BaseException:
            metadata.close()
            raise
        return backend.own_metadata()

    return open_kms


CUSTODY_REGISTRY: dict[str, Callable[[Settings, PassphraseSource], BackendFactory]] = {
    "enclave": _enclave_factory,
    "hsm": _hsm_factory,
    "kms": _kms_factory,
    "keystore": _keystore_factory,
}


def default_custody(settings: Settings) -> list[str]:
    """Enabled custody types, in key-lookup order: those whose lookups need no secret first.

    The HSM joins when it is configured (an ``[hsm]`` table or ``SIGND_HSM_MODULE``), KMS-key
    custody when a ``[kms_custody]`` table (or a ``SIGND_KMS_CUSTODY_*`` variable) is.
    """
    hsm = ["hsm"] if settings.section("hsm") else []
    kms = ["kms"] if settings.section("kms_custody") else []
    return ["enclave", *hsm, *kms, "keystore"]


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
