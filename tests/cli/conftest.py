from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from signd.cli.context import state
from signd.cli.main import app

PASSPHRASE = "correct horse battery staple for tests"


@dataclass
class Cli:
    home: Path
    runner: CliRunner

    def run(self, *args: str, input: str | None = None, ok: bool = True) -> Any:
        """Run `signd --home HOME args --json`; return parsed JSON (or the error body)."""
        state.close()
        result = self.runner.invoke(app, ["--home", str(self.home), *args], input=input)
        state.close()
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 1, result.output
        return json.loads(result.stdout) if result.stdout.strip().startswith("{") else result

    def new_key(self, *extra: str) -> dict[str, Any]:
        return self.run("keys", "new", "--json", *extra)["keys"][0]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text("[keystore]\nscrypt_n = 1024\n")
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("SIGND_HOME", raising=False)
    yield Cli(home, CliRunner())
    state.close()
