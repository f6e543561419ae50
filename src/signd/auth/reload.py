"""Configuration that can be replaced while running, and never by a bad file.

The clients registry and the policy are both read from a file and swapped without a restart.
A :class:`Reloadable` holds the value in force: :meth:`Reloadable.replace` parses the new
bytes first and swaps only if they are valid, so a bad file is refused (the error is logged
and raised to the caller) and the old value stays. Readers take :attr:`Reloadable.current`
once per request and use that snapshot throughout; the swap is a single reference
assignment.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Generic, Self, TypeVar

from signd.auth.clients import ClientsRegistry
from signd.errors import ConfigurationError

T = TypeVar("T")

SETTLE_SECONDS = 0.2
"""How long a file read for a reload must stay the same before it is taken: a file being
written in place is not put in force half written (a prefix can be valid and looser: a
rule cut before its limits)."""
SETTLE_ATTEMPTS = 10

log = logging.getLogger(__name__)


class Reloadable(ABC, Generic[T]):
    """The value in force, parsed from a file's bytes by :meth:`parse`.

    ``path`` is where :meth:`reload` reads from; inside an enclave, where the host hands
    the bytes over, :meth:`replace` is called with them directly.
    """

    kind: ClassVar[str]
    """What the file is, for logs and errors: "clients", "policy"."""

    def __init__(self, data: bytes, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._current = self.parse(data)
        self._sha256 = hashlib.sha256(data).hexdigest()
        log.info("%s loaded, sha256 %s", self.kind, self._sha256)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read and parse the file at ``path``; it is also where :meth:`reload` reads."""
        return cls(_read(cls.kind, Path(path)), path=path)

    @staticmethod
    @abstractmethod
    def parse(data: bytes) -> T:
        """Validate the file's bytes; raise :class:`~signd.errors.ConfigurationError`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sha256={self._sha256[:16]}..., path={self.path})"

    @property
    def current(self) -> T:
        return self._current

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the bytes the value in force was parsed from."""
        return self._sha256

    def replace(self, data: bytes) -> T:
        """Parse ``data`` and make it the value in force; on any error keep the old one."""
        with self._lock:
            try:
                value = self.parse(data)
            except ConfigurationError as exc:
                log.error("%s refused, keeping sha256 %s: %s", self.kind, self._sha256, exc)
                raise
            self._current = value
            self._sha256 = hashlib.sha256(data).hexdigest()
            log.info("%s reloaded, sha256 %s", self.kind, self._sha256)
            return value

    def reload(self) -> T:
        """Re-read :attr:`path` and :meth:`replace` the value with it."""
        if self.path is None:
            raise ConfigurationError(f"the {self.kind} file was not loaded from a path")
        try:
            data = read_settled(self.kind, self.path)
        except ConfigurationError as exc:
            log.error("%s refused, keeping sha256 %s: %s", self.kind, self._sha256, exc)
            raise
        return self.replace(data)


class ClientsHolder(Reloadable[ClientsRegistry]):
    """The clients registry in force; give it to :class:`~signd.auth.RequestVerifier`."""

    kind = "clients"

    @staticmethod
    def parse(data: bytes) -> ClientsRegistry:
        return ClientsRegistry.from_bytes(data)


def read_settled(kind: str, path: Path) -> bytes:
    """The bytes of the ``kind`` file at ``path`` once they stay the same for
    :data:`SETTLE_SECONDS`; a file still changing after :data:`SETTLE_ATTEMPTS` reads is
    refused (:class:`~signd.errors.ConfigurationError`)."""
    data = _read(kind, path)
    for _ in range(SETTLE_ATTEMPTS):
        time.sleep(SETTLE_SECONDS)
        again = _read(kind, path)
        if again == data:
            return data
        data = again
    raise ConfigurationError(
        f"the {kind} file {path} kept changing while it was read: write it whole (to a "
        "temporary file, then rename it) and reload again"
    )


def _read(kind: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {kind} file {path}: {exc.strerror}") from None
