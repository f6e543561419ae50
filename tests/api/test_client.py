"""The Python client (:mod:`signd.client`) against answers signd gives and answers it never
gives: each becomes one :class:`~signd.errors.SigndError`, of the class the answer names."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

import signd.api.mqtt  # with the CLI: every module that defines an error class
import signd.cli.main  # noqa: F401
from signd.api.errors import RateLimited, RouteNotFound
from signd.client import SigndClient
from signd.errors import ConfigurationError, DependencyUnavailable, KeyNotFound, SigndError
from signd.gate.errors import PolicyDenied
from tests.fixtures.servers import http_answer, trickler
from tests.gate.support import BOTH_GATES, Gated

Handler = Callable[[httpx.Request], httpx.Response]


def client_over(handler: Handler) -> SigndClient:
    return SigndClient("http://signd.test", token="t", transport=httpx.MockTransport(handler))


def answering(status: int, body: object = None, **options: object) -> SigndClient:
    """A client whose server answers every request with ``status`` and ``body`` as JSON (or
    ``content=`` bytes as they are)."""
    return client_over(lambda request: httpx.Response(status, json=body, **options))  # type: ignore[arg-type]


def signd_error_codes() -> dict[str, str]:
    """Every code signd's own error classes name, with the class's name."""
    found: dict[str, str] = {}
    pending: list[type[SigndError]] = [SigndError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("signd."):
            found.setdefault(cls.code, cls.__name__)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_code_comes_back_as_its_class_whatever_was_imported() -> None:
    """In a fresh interpreter that imported only the client (as ``signd --url`` does), each
    code signd answers with becomes its own class, not ``internal_error``."""
    codes = signd_error_codes()
    assert {"not_found", "rate_limited", "too_many_requests", "attestation_invalid"} <= set(codes)
    program = """
import json, sys
import httpx
from signd.client import error_from
request = httpx.Request("GET", "http://signd.test/v1/keys")
for code in json.loads(sys.argv[1]):
    answer = httpx.Response(400, json={"error": {"code": code, "message": "m"}}, request=request)
    error = error_from(answer)
    print(code, type(error).__name__, error.code, error.message)
"""
    result = subprocess.run(
        [sys.executable, "-c", program, json.dumps(sorted(codes))],
        capture_output=True,
        text=True,
        check=True,
    )
    seen = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert seen == {code: [name, code, "m"] for code, name in codes.items()}


def test_an_unknown_code_is_the_root_error_naming_the_code() -> None:
    client = answering(400, {"error": {"code": "martian", "message": "no", "field": "f"}})
    with pytest.raises(SigndError) as raised:
        client.healthz()
    assert type(raised.value) is SigndError
    assert (raised.value.message, raised.value.field) == ("'martian': no", "f")


def test_a_policy_refusal_keeps_its_rule() -> None:
    body = {"error": {"code": "policy_denied", "message": "no", "rule": "hot"}}
    with pytest.raises(PolicyDenied) as raised:
        answering(403, body).healthz()
    assert raised.value.rule == "hot"


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (404, RouteNotFound, "not_found"),
        (429, RateLimited, "rate_limited"),
        (502, DependencyUnavailable, "dependency_unavailable"),
        (503, DependencyUnavailable, "dependency_unavailable"),
        (418, SigndError, "internal_error"),
    ],
)
def test_an_error_status_without_a_signd_body_keeps_the_status_meaning(
    status: int, cls: type[SigndError], code: str
) -> None:
    page = b"<html><body>" + b"x" * 10_000 + b"</body></html>"
    client = client_over(lambda request: httpx.Response(status, content=page))
    with pytest.raises(cls) as raised:
        client.list_keys()
    assert raised.value.code == code
    message = raised.value.message
    assert message.startswith(f"signd at http://signd.test answered HTTP {status} without")
    assert "'<html><body>xxx" in message and len(message) < 200


PUBLIC_CALLS: dict[str, Callable[[SigndClient], object]] = {
    "healthz": SigndClient.healthz,
    "readyz": SigndClient.readyz,
    "openapi": SigndClient.openapi,
    "attestation": SigndClient.attestation,
}


@pytest.mark.parametrize("call", PUBLIC_CALLS.values(), ids=PUBLIC_CALLS.keys())
def test_public_routes_refuse_an_answer_signd_never_gives(
    call: Callable[[SigndClient], object],
) -> None:
    page = client_over(lambda request: httpx.Response(200, content=b"<html>hello</html>"))
    with pytest.raises(DependencyUnavailable, match="with HTTP 200 and a body starting '<html>"):
        call(page)
    with pytest.raises(DependencyUnavailable, match="JSON without the fields expected"):
        call(answering(200, [1, 2]))
    moved = client_over(lambda request: httpx.Response(301, headers={"location": "/elsewhere"}))
    with pytest.raises(DependencyUnavailable, match="HTTP 301, which signd never answers"):
        call(moved)
    with pytest.raises(DependencyUnavailable, match=r"cannot reach signd at http://127\.0\.0\.1:1"):
        call(SigndClient("http://127.0.0.1:1", token="t"))


def test_readiness_is_told_ready_or_not() -> None:
    parts = [{"part": "audit", "status": "down", "message": "disk full"}]
    assert answering(503, {"ready": False, "parts": parts}).readyz()["parts"] == parts
    assert answering(200, {"ready": True, "parts": []}).readyz() == {"ready": True, "parts": []}
    with pytest.raises(DependencyUnavailable, match="answered HTTP 502 without a signd error"):
        answering(502, {"ready": True, "parts": []}).readyz()


def test_a_signed_transaction_that_does_not_decode_is_the_server_fault_not_the_caller() -> None:
    client = answering(200, {"raw_transaction": "0x02c0"})
    with pytest.raises(DependencyUnavailable, match="JSON without the fields expected"):
        client.sign_eth_transaction("0x35", {})


@pytest.fixture
def alice_client(gated: Gated, tmp_path: Path) -> Iterator[SigndClient]:
    """The client as alice, over the gated app in this process (the real gate and
    signature check, host or enclave), which gets each request's path exactly as sent."""
    key_file = tmp_path / "alice.pem"
    key_file.write_bytes(
        gated.alice.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )

    def forward(request: httpx.Request) -> httpx.Response:
        answer = gated.client.request(
            request.method,
            request.url.raw_path.decode(),
            headers=request.headers,
            content=request.content,
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    with SigndClient(
        "http://signd.test", "alice", key_file, transport=httpx.MockTransport(forward)
    ) as client:
        yield client


@BOTH_GATES
@pytest.mark.parametrize("ref", ["..", ".", "x#frag", "a?b=c", "0x35 ;*'(é)"])
def test_a_key_reference_is_one_path_segment_signed_as_sent(
    alice_client: SigndClient, hot_key: dict[str, object], ref: str
) -> None:
    assert alice_client.get_key(str(hot_key["address"])).key_id == hot_key["key_id"]
    with pytest.raises(KeyNotFound) as raised:
        alice_client.get_key(ref)
    assert repr(ref) in raised.value.message  # the server looked up exactly this reference
    # (a "%" in a reference is left to tests/cli/test_remote.py: Starlette's TestClient
    # percent-decodes a path twice, a real server once)


@BOTH_GATES
@pytest.mark.parametrize("ref", ["../../healthz", "../keys", "a/b"])
def test_a_key_reference_with_a_slash_reaches_no_other_route(
    alice_client: SigndClient, hot_key: dict[str, object], ref: str
) -> None:
    with pytest.raises(RouteNotFound):
        alice_client.get_key(ref)


def test_a_signing_request_left_unanswered_may_have_been_performed() -> None:
    """A read that times out after the request went out is not 'cannot reach': the request
    may have been signed, and the message says so."""

    def silent(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(DependencyUnavailable) as caught:
        client_over(silent).sign_eth_message("0x35", b"hi")
    assert "did not answer POST /v1/sign/ethereum/message" in caught.value.message
    assert "may have been performed" in caught.value.message
    with pytest.raises(DependencyUnavailable) as read:
        client_over(silent).healthz()
    assert "may have been performed" not in read.value.message


TRICKLE_PAUSE = 0.05
"""A byte every 50 ms: each read is far within the client's timeout."""
HEALTHY = http_answer(b'{"status": "ok", "padding": "' + b"." * 40 + b'"}')
"""An answer of about 170 bytes: over 8 s at that pace."""


@pytest.mark.parametrize(
    ("at_once", "trickled"),
    [(b"", HEALTHY), (HEALTHY[:-40], HEALTHY[-40:])],
    ids=["whole answer", "body"],
)
def test_a_server_that_trickles_its_answer_is_given_up_on_at_the_timeout(
    at_once: bytes, trickled: bytes
) -> None:
    """httpx's timeouts bound each network operation; the client's bounds the whole call,
    however slowly a server (or something in its place) sends."""
    timeout = 0.5
    with trickler(at_once, trickled, pause=TRICKLE_PAUSE) as url:
        client = SigndClient(url, token="t", timeout=timeout)
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as raised:
            client.healthz()
        took = time.monotonic() - started
        client.close()
    assert raised.value.code == "deadline_exceeded"
    assert raised.value.message == (
        f"signd at {url} did not answer GET /healthz within {timeout:g} s"
    )
    assert timeout <= took < timeout + 0.5


def test_a_signing_request_cut_by_the_timeout_may_have_been_performed() -> None:
    with trickler(b"", HEALTHY, pause=TRICKLE_PAUSE) as url:
        client = SigndClient(url, token="t", timeout=0.3)
        with pytest.raises(DependencyUnavailable) as raised:
            client.sign_hash("0x35", bytes(32))
        client.close()
    assert raised.value.code == "deadline_exceeded"
    assert raised.value.message.endswith("(the request was sent and may have been performed)")


def test_the_timeout_leaves_a_prompt_server_alone() -> None:
    """Calls that finish in time are answered, one after the other on the same client."""
    with trickler(HEALTHY, b"", pause=0) as url, SigndClient(url, token="t", timeout=0.5) as client:
        for _ in range(3):
            assert client.healthz()["status"] == "ok"


def test_a_timeout_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        SigndClient("http://127.0.0.1:1", token="t", timeout=0)


def test_a_server_that_never_takes_the_connection_is_not_reached_within_the_timeout() -> None:
    """A listener whose backlog is full: the kernel leaves the connection unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        try:
            with SigndClient(f"http://127.0.0.1:{port}", token="t", timeout=0.5) as client:
                started = time.monotonic()
                with pytest.raises(DependencyUnavailable) as raised:
                    client.healthz()
                took = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert raised.value.code == "deadline_exceeded"
    assert raised.value.message == f"cannot reach signd at http://127.0.0.1:{port} within 0.5 s"
    assert took < 1.0
