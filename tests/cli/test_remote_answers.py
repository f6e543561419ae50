"""``signd --url`` against servers that do not answer as signd does: every odd answer, every
transport failure and every bad URL ends in one line (or ``{"error": ...}``) and exit status 1,
never a traceback, and never shows a password given in the URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from typer.testing import CliRunner, Result

from signd.cli.context import state
from signd.cli.main import app


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    path = tmp_path / "client.key"
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return path


def remote(url: str, client_key: Path, *args: str) -> Result:
    """``signd --url URL --client-id dev --client-key KEY ARGS``, which must fail cleanly."""
    state.close()
    command = ["--url", url, "--client-id", "dev", "--client-key", str(client_key), *args]
    result = CliRunner().invoke(app, command)
    state.close()
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def remote_error(url: str, client_key: Path, *args: str) -> dict[str, str]:
    """The ``{"error": ...}`` body ``signd --url URL ARGS --json`` prints."""
    body: dict[str, dict[str, str]] = json.loads(remote(url, client_key, *args, "--json").stdout)
    return body["error"]


def test_a_password_in_the_url_is_never_shown(client_key: Path) -> None:
    url = "http://user:s3cretpass@127.0.0.1:1"
    shown = remote(url, client_key, "keys", "list").output
    assert "cannot reach signd at http://127.0.0.1:1" in shown
    assert "s3cretpass" not in shown and "user" not in shown
    error = remote_error(url, client_key, "keys", "list")
    assert error["code"] == "dependency_unavailable"
    assert "s3cretpass" not in json.dumps(error)


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8645", "localhost:8645", "", "ftp://127.0.0.1", "http://", "http://h:x"]
)
def test_a_url_without_http_scheme_or_host_is_refused_in_one_line(
    client_key: Path, url: str
) -> None:
    error = remote_error(url, client_key, "keys", "list")
    assert error == {
        "code": "invalid_field",
        "message": "the signd URL must be http:// or https:// and a host,"
        " as in http://127.0.0.1:8645",
        "field": "url",
    }
