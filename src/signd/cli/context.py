"""Per-invocation state shared by the commands: settings and the lazily built signer.

With ``--url`` (or ``SIGND_URL``) the signer is a :class:`~signd.client.RemoteSigner`: the
key and sign commands go through the running service, signed as ``--client-id`` with
``--client-key``, each call within ``--timeout``, and no custody is opened here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from signd.config import Settings, load_settings
from signd.errors import ConfigurationError
from signd.operations import Signer
from signd.operations.backends import build_signer, keystore_passphrase_source


@dataclass
class CliState:
    home: Path | None = None
    url: str | None = None
    client_id: str | None = None
    client_key: Path | None = None
    timeout: float | None = None
    """Seconds each call to ``url`` may take in all (``None``: the client's default)."""
    gate_only_enclave: bool = False
    """Start the local enclave so that it makes and uses sealed keys only through its gate
    (``signd serve`` sets it: every sealed key's request goes through the gate there)."""
    take_keystore_passphrase_from_environment: bool = False
    """Remove ``SIGND_KEYSTORE_PASSPHRASE`` from the environment once the keystore has read it
    (``signd serve`` sets it: a process that runs on should not hand it to later children)."""
    _signer: Signer | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        return load_settings(self.home)

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = self._remote() if self.url is not None else self._local()
        return self._signer

    def _local(self) -> Signer:
        settings = self.settings
        if self.gate_only_enclave:
            settings = settings.overriding("enclave", gate_only=True)
        passphrase = keystore_passphrase_source(
            settings, take_from_environment=self.take_keystore_passphrase_from_environment
        )
        return build_signer(settings, passphrase)

    def _remote(self) -> Signer:
        from signd.client import DEFAULT_TIMEOUT, RemoteSigner, SigndClient

        assert self.url is not None
        if not self.client_id or self.client_key is None:
            raise ConfigurationError(
                "--url needs --client-id and --client-key (or SIGND_CLIENT_ID, SIGND_CLIENT_KEY)"
            )
        timeout = DEFAULT_TIMEOUT if self.timeout is None else self.timeout
        return RemoteSigner(SigndClient(self.url, self.client_id, self.client_key, timeout=timeout))

    def close(self) -> None:
        if self._signer is not None:
            self._signer.close()
            self._signer = None


state = CliState()
