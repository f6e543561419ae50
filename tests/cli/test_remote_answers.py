"""``signd --url`` against servers that do not answer as signd does: every odd answer, every
transport failure and every bad URL ends in one line (or ``{"error": ...}``) and exit status 1,
never a traceback, and never shows a password given in the URL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from typer.testing import CliRunner, Result

from signd.cli.context import state
from signd.cli.main import app
from tests.fixtures.servers import http_answer, trickler


@dataclass
class Canned:
    """What a fake server answers every request with, and the paths it was asked for."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)


@contextmanager
def fake_server(canned: Canned) -> Iterator[str]:
    """A local HTTP server that answers ``canned`` to everything; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            canned.paths.append(self.path)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(canned.status)
            for name, value in {"content-length": str(len(canned.body)), **canned.headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(canned.body)

        def do_GET(self) -> None:
            self.answer()

        def do_POST(self) -> None:
            self.answer()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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


HTML = b"<!DOCTYPE html><html><body>" + b"not signd " * 1000 + b"</body></html>"
KEY = "0x3535353535353535353535353535353535353535"
COMMANDS = {
    "keys list": ["keys", "list", "--custody", "enclave"],
    "keys show": ["keys", "show", KEY],
    "keys new": ["keys", "new"],
    "sign eth-message": ["sign", "eth-message", "--key", KEY, "--text", "hi"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (200, HTML, {"content-type": "text/html"}),
        (302, b"", {"location": "/v1/keys?custody=keystore"}),
        (200, b"[1, 2]", {"content-type": "application/json"}),
        (200, b'{"keys": 5, "signature": 7}', {"content-type": "application/json"}),
    ],
    ids=["html-page", "redirect", "json-array", "json-of-another-shape"],
)
def test_an_answer_signd_never_gives_is_one_error_line(
    client_key: Path, status: int, body: bytes, headers: dict[str, str], command: list[str]
) -> None:
    canned = Canned(status, body, headers)
    with fake_server(canned) as url:
        shown = remote(url, client_key, *command).output
        error = remote_error(url, client_key, *command)
    assert shown.startswith(f"error dependency_unavailable: signd at {url} answered ")
    assert shown.count("\n") == 1 and len(shown) < 300  # never the page itself
    assert error["code"] == "dependency_unavailable"
    assert error["message"].endswith("not an answer signd gives")
    assert len(canned.paths) == 2  # a redirect is not followed


def test_an_error_page_keeps_the_status_meaning(client_key: Path) -> None:
    with fake_server(Canned(404, HTML, {"content-type": "text/html"})) as url:
        error = remote_error(url, client_key, "keys", "list")
    assert error["code"] == "not_found"
    assert error["message"].startswith(f"signd at {url} answered HTTP 404 without a signd error")


def test_a_server_that_trickles_its_answer_ends_in_one_line_at_the_timeout(
    client_key: Path,
) -> None:
    """A byte every 50 ms keeps every read alive; ``--timeout`` still ends the call, as one
    error line (or ``{"error": ...}``) and exit status 1."""
    answer = http_answer(b'{"keys": [], "next_cursor": null}')
    with trickler(b"", answer, pause=0.05) as url:
        started = time.monotonic()
        shown = remote(url, client_key, "--timeout", "0.5", "keys", "list").output
        took = time.monotonic() - started
        error = remote_error(url, client_key, "--timeout", "0.5", "keys", "list")
    assert shown == (
        f"error deadline_exceeded: signd at {url} did not answer GET /v1/keys within 0.5 s\n"
    )
    assert took < 2.0
    assert error["code"] == "deadline_exceeded"


def test_a_timeout_that_is_not_positive_is_one_error_line(client_key: Path) -> None:
    shown = remote("http://127.0.0.1:1", client_key, "--timeout", "0", "keys", "list").output
    assert shown.startswith("error configuration_error: the client's timeout must be")
