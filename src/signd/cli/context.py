"""Per-invocation state shared by the commands: settings and the lazily built signer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from signd.config import Settings, load_settings
from signd.operations import Signer
from signd.operations.backends import build_signer


@dataclass
class CliState:
    home: Path | None = None
    _signer: Signer | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        return load_settings(self.home)

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = build_signer(self.settings)
        return self._signer

    def close(self) -> None:
        if self._signer is not None:
            self._signer.close()
            self._signer = None


state = CliState()
