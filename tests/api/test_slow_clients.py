"""Clients that hold connections open, over real sockets: a body not all in within
``body_timeout`` gets 408 and its connection is closed, whoever sent it; past
``max_connections`` open connections uvicorn answers 503.

Against ``signd serve`` as deployed (authentication reads the body first), and the app under
uvicorn's two HTTP implementations without authentication (the handlers read the body).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from signd.api import ApiSettings, allow_anonymous_for_tests, create_app
from signd.cli.serve import OTHER_DESCRIPTORS
from signd.operations import Signer
from tests.api.conftest import make_home
from tests.api.processes import AUTH, TEST_TOKEN, SigndProcess, logged_statuses, signd_serve
from tests.fixtures.servers import free_port

pytestmark = pytest.mark.integration

WAIT = 10.0
"""How long a socket waits for the server: the tests fail, never hang, when it does not answer."""
DECLARED_LENGTH = 1000
"""The Content-Length the stalled requests announce; they send one byte of it."""
REST_BODY_PATHS = ("/v1/sign/ethereum/message", "/v1/keys")


@contextmanager
def connection(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as opened:
        yield opened


def send_head(
    opened: socket.socket, method: str, path: str, length: int, auth: bool, body: bytes = b""
) -> None:
    """A request's head announcing ``length`` bytes of body (with the tests client's bearer
    token when ``auth``), and the first ``body`` bytes in the same write."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if auth:
        head += f"Authorization: {AUTH['authorization']}\r\n"
    opened.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode() + body)


def read_until_closed(opened: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (``WAIT`` at most)."""
    received = b""
    while chunk := opened.recv(65536):
        received += chunk
    return received


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 response's status, headers (lower-case names) and body."""
    head, body = raw.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def read_response(opened: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a connection that stays open (its body has a Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = opened.recv(65536)
        assert chunk, f"the connection closed after {received!r}"
        received += chunk
    status, headers, body = split_response(received)
    while len(body) < int(headers.get("content-length", "0")):
        body += opened.recv(65536)
    return status, headers, body


def stalled_request(port: int, path: str, auth: bool) -> tuple[float, int, dict[str, str], Any]:
    """Headers announcing ``DECLARED_LENGTH`` bytes and one byte of body, then nothing: the
    seconds until the server closed the connection, and its answer (the body as JSON)."""
    with connection(port) as opened:
        started = time.monotonic()
        send_head(opened, "POST", path, DECLARED_LENGTH, auth, body=b"{")
        answer = read_until_closed(opened)
        waited = time.monotonic() - started
    status, headers, body = split_response(answer)
    return waited, status, headers, json.loads(body)


def assert_timed_out(path: str, answer: Any, body_timeout: float) -> None:
    waited, status, headers, body = answer
    assert body_timeout * 0.9 <= waited < WAIT / 2, f"{path}: closed after {waited:.2f}s"
    assert status == 408, (path, body)
    assert headers["connection"] == "close"
    message = f"the request body did not arrive within {body_timeout:g} s"
    if path in REST_BODY_PATHS:
        assert body == {"error": {"code": "request_timeout", "message": message}}
    else:  # JSON-RPC: no request object arrived, so there is no id to answer
        assert body["id"] is None
        assert body["error"]["code"] == -32600  # no request was read: not its params
        assert body["error"]["message"] == message
        assert body["error"]["data"] == {"code": "request_timeout"}


def in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run the zero-argument ``calls`` in threads at once; their results, in order."""
    results: list[Any] = [None] * len(calls)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * WAIT)
    if failures:
        raise failures[0]
    return results


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigndProcess]:
    """``signd serve`` with a one-second ``body_timeout`` (the tests bearer client)."""
    home = make_home(tmp_path_factory.mktemp("slow") / "home", extra="[api]\nbody_timeout = 1\n")
    with signd_serve(home) as server:
        yield server


def port_of(server: SigndProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_signd_serve_answers_408_and_closes_when_a_body_stalls(serving: SigndProcess) -> None:
    """The repro: no credentials needed (authentication waits for the body it covers), and a
    client whose credentials are good but whose Content-Length overstates its body."""
    port = port_of(serving)
    cases = [("/v1/sign/ethereum/message", False), ("/rpc", False), ("/v1/keys", True)]
    answers = in_parallel(*(partial(stalled_request, port, path, auth) for path, auth in cases))
    for (path, _), answer in zip(cases, answers, strict=True):
        assert_timed_out(path, answer, 1)
    statuses = logged_statuses(serving, *(path for path, _ in cases))
    metrics = httpx.get(f"{serving.url}/metrics", timeout=WAIT).text
    for path, _ in cases:
        assert statuses[path] == [408]
    assert 'signd_errors_total{code="request_timeout"} 3\n' in metrics
    log = serving.log.read_text()
    assert "Traceback" not in log
    assert TEST_TOKEN not in log


def test_signd_serve_takes_a_slow_body_that_arrives_in_time(serving: SigndProcess) -> None:
    body = json.dumps({"chain": "ethereum", "custody": "keystore"}).encode()
    with connection(port_of(serving)) as opened:
        send_head(opened, "POST", "/v1/keys", len(body), auth=True)
        third = len(body) // 3
        for part in (body[:third], body[third : 2 * third], body[2 * third :]):  # over 0.6 s
            time.sleep(0.2)
            opened.sendall(part)
        status, _, answer = read_response(opened)
    assert status == 201, answer
    assert json.loads(answer)["keys"][0]["chain"] == "ethereum"


def test_signd_serve_refuses_a_body_timeout_that_is_not_a_positive_number(
    tmp_path: Path,
) -> None:
    home = make_home(tmp_path / "home", extra='[api]\nbody_timeout = "30s"\n')
    with pytest.raises(RuntimeError) as refused, signd_serve(home):
        pass
    assert "api.body_timeout must be a positive number of seconds" in str(refused.value)


def test_signd_serve_answers_503_past_max_connections(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", extra="[api]\nmax_connections = 2\n")
    with signd_serve(home) as server, ExitStack() as held:
        port = port_of(server)
        for _ in range(2):  # both served, and kept open (keep-alive)
            opened = held.enter_context(connection(port))
            send_head(opened, "GET", "/healthz", 0, auth=False)
            assert read_response(opened)[0] == 200
        with connection(port) as third:
            send_head(third, "GET", "/healthz", 0, auth=False)
            answer = read_until_closed(third)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nconnection: close\r\n" in answer.lower()
        assert answer.endswith(b"\r\n\r\nService Unavailable")
        held.close()  # two connections fewer: there is room again
        deadline = time.monotonic() + WAIT
        while (status := httpx.get(f"{server.url}/healthz", timeout=WAIT).status_code) == 503:
            assert time.monotonic() < deadline, "the closed connections still count"
            time.sleep(0.05)
        assert status == 200


@contextmanager
def open_files_limited(soft: int) -> Iterator[None]:
    """This process's soft limit on open files is ``soft`` in the block (what a process it
    starts there inherits), and back as it was after."""
    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert len(os.listdir("/proc/self/fd")) < soft - 20, "the test process holds too many files"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (was, hard))


def open_files_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def test_signd_serve_raises_a_soft_open_files_limit_below_max_connections(
    tmp_path: Path,
) -> None:
    """Started under a soft limit of 160 open files with max_connections = 200: signd serve
    raises it, so that past 200 idle connections a request still gets uvicorn's 503 rather
    than a connection the kernel resets for want of a descriptor."""
    home = make_home(tmp_path / "home", extra="[api]\nmax_connections = 200\n")
    with ExitStack() as stack:
        with open_files_limited(160):
            server = stack.enter_context(signd_serve(home))
        assert open_files_soft_limit(server.process.pid) == 200 + OTHER_DESCRIPTORS
        port = port_of(server)
        for _ in range(200):
            stack.enter_context(connection(port))
        with connection(port) as one_more:
            send_head(one_more, "GET", "/healthz", 0, auth=False)
            answer = read_until_closed(one_more)
        assert answer.startswith(b"HTTP/1.1 503 "), answer


def test_a_hard_open_files_limit_below_max_connections_is_warned_of() -> None:
    program = (
        "import logging, resource; logging.basicConfig();"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100));"
        "from signd.cli.serve import _open_files_for; _open_files_for(1000);"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert ran.stdout.strip() == "(100, 100)"
    assert "at most 100 files may be open (RLIMIT_NOFILE), fewer than max_connections" in (
        ran.stderr
    )


@contextmanager
def under_uvicorn(app: ASGIApp, http: str) -> Iterator[int]:
    """``app`` under uvicorn with the ``http`` implementation, in a thread; its port."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=http, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(WAIT)


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_each_reader_of_bodies_answers_408_and_closes_under_both_uvicorn_parsers(
    signer: Signer, http: str
) -> None:
    """Without authentication the handlers read the body: the REST signing routes, the
    Starlette routes and JSON-RPC each answer 408 within ``body_timeout``."""
    app = create_app(signer, ApiSettings(body_timeout=0.3), authenticate=allow_anonymous_for_tests)
    paths = [*REST_BODY_PATHS, "/rpc"]
    with under_uvicorn(app, http) as port:
        answers = in_parallel(*(partial(stalled_request, port, path, False) for path in paths))
    for path, answer in zip(paths, answers, strict=True):
        assert_timed_out(path, answer, 0.3)
