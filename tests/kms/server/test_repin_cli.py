"""``signd kms repin``: what it refuses, the confirmation, and the policy it puts.

The end-to-end upgrade (a real enclave whose code changes) is in
tests/integration/test_attested_kms.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from signd.cli.context import state
from signd.cli.main import app
from signd.kms.server import start_kms_server
from signd.kms.server.http import answers
from signd.operations.local_kms import ATTESTED_ALIAS, attested_key_policy, ensure_data_key_alias

pytestmark = pytest.mark.integration

OLD = bytes.fromhex("0a" * 48)
NEW = bytes.fromhex("0b" * 48)


def repin(home: Path, *args: str, stdin: str | None = None) -> Result:
    state.close()
    return CliRunner().invoke(app, ["--home", str(home), "kms", "repin", *args], input=stdin)


def policy(home: Path) -> str:
    with start_kms_server(home) as server:
        client = server.client()
        document = str(client.get_key_policy(KeyId=ATTESTED_ALIAS)["Policy"])
    (home / "kms-server.json").unlink()
    return document


@pytest.fixture
def pinned_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    with start_kms_server(home) as server:
        ensure_data_key_alias(server.client(), pcr0=OLD)
    (home / "kms-server.json").unlink()
    return home


def test_refusals(tmp_path: Path, pinned_home: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = repin(empty, "--yes", "--pcr0", NEW.hex())
    assert result.exit_code == 1
    assert "no embedded kms-server" in result.output

    configured = tmp_path / "aws"
    configured.mkdir()
    (configured / "signd.toml").write_text('[kms]\ntype = "aws"\nkey_id = "alias/x"\n')
    result = repin(configured, "--yes")
    assert result.exit_code == 1
    assert "signd kms policy" in result.output

    result = repin(pinned_home, "--pcr0", "abcd", "--yes")
    assert result.exit_code == 1
    assert "96 hex digits" in result.output

    unattested = tmp_path / "unattested"
    with start_kms_server(unattested) as server:
        ensure_data_key_alias(server.client(), pcr0=None)
    result = repin(unattested, "--yes", "--pcr0", NEW.hex())
    assert result.exit_code == 1
    assert f"no {ATTESTED_ALIAS}" in result.output


def test_confirmation(pinned_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = policy(pinned_home)
    result = repin(pinned_home, "--pcr0", NEW.hex(), "--json")
    assert result.exit_code == 1
    assert "--yes" in json.loads(result.stdout)["error"]["message"]
    assert policy(pinned_home) == before

    monkeypatch.setattr("signd.cli.kms._interactive", lambda: True)
    result = repin(pinned_home, "--pcr0", NEW.hex(), stdin="n\n")
    assert result.exit_code == 1
    assert OLD.hex() in result.output
    assert NEW.hex() in result.output
    assert "unseal every key" in result.output
    assert policy(pinned_home) == before

    result = repin(pinned_home, "--pcr0", NEW.hex(), stdin="y\n")
    assert result.exit_code == 0, result.output
    assert f"re-pinned {ATTESTED_ALIAS}" in result.output
    assert policy(pinned_home) == attested_key_policy(NEW)


def test_the_put_policy_is_the_first_run_policy_with_the_new_pcr0(pinned_home: Path) -> None:
    result = repin(pinned_home, "--pcr0", "0x" + NEW.hex().upper(), "--yes", "--json")
    assert result.exit_code == 0, result.output
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer["old_pcr0"] == [OLD.hex()]
    assert answer["new_pcr0"] == NEW.hex()
    assert answer["changed"] is True
    endpoint = json.loads((pinned_home / "kms-server.json").read_text())["endpoint"]
    assert not answers(endpoint), "the kms-server the command started must be stopped"
    assert policy(pinned_home) == attested_key_policy(NEW)


def test_help_says_what_it_unlocks() -> None:
    result = CliRunner().invoke(app, ["kms", "repin", "--help"])
    assert result.exit_code == 0
    assert "UNSEAL EVERY KEY IN THAT HOME" in " ".join(result.output.split())
