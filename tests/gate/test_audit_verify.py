"""``signd audit verify`` on a log the gated service produced, then on tampered copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from signd.cli.context import state
from signd.cli.main import app
from tests.gate.support import BOTH_GATES, Gated, transaction


def verify(home: Path, log: Path | None = None) -> tuple[int, dict[str, Any]]:
    state.close()
    extra = ["--log", str(log)] if log else []
    result = CliRunner().invoke(app, ["--home", str(home), "audit", "verify", "--json", *extra])
    state.close()
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def produced(gated: Gated, hot_key: dict[str, Any]) -> Gated:
    """A log of allowed and refused decisions (and an unauthenticated request)."""
    for chain_id in (1, 5, 11155111, 7):
        request = {"key": hot_key["address"], "transaction": transaction(chain_id=chain_id)}
        gated.signed("POST", "/v1/sign/ethereum/transaction", request)
    gated.client.post("/v1/sign/ethereum/message", json={"key": "x", "message": "m"})
    return gated


@BOTH_GATES
def test_the_produced_log_verifies(produced: Gated) -> None:
    home = produced.paths.audit_log.parent
    code, report = verify(home)
    assert code == 0, report
    assert report["ok"] and report["records"] == 6 and report["problems"] == []


@BOTH_GATES
@pytest.mark.parametrize(
    ("tamper", "kind"),
    [
        (lambda lines: lines[:2] + lines[3:], "removed"),
        (lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]], "reordered"),
        (
            lambda lines: [*lines[:2], lines[2].replace('"refused"', '"allowed"'), *lines[3:]],
            "altered",
        ),
        (
            lambda lines: [*lines[:2], lines[2].replace("chain id 5", "chain id 1"), *lines[3:]],
            "altered",
        ),
    ],
)
def test_a_tampered_log_fails(produced: Gated, tmp_path: Path, tamper: Any, kind: str) -> None:
    lines = produced.paths.audit_log.read_text().splitlines()
    assert '"refused"' in lines[2]
    assert "chain id 5" in lines[2]
    copy = tmp_path / "tampered.log"
    copy.write_text("\n".join(tamper(lines)) + "\n")
    code, report = verify(produced.paths.audit_log.parent, copy)
    assert code == 1
    assert kind in {problem["kind"] for problem in report["problems"]}


def test_the_wrong_key_is_reported(produced: Gated) -> None:
    home = produced.paths.audit_log.parent
    produced.paths.audit_key_file.write_text("ab" * 32 + "\n")
    code, report = verify(home)
    assert code == 1 and report["problems"][0]["kind"] == "bad_mac"
