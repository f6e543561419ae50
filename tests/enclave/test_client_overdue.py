"""The threads' client to the enclave when one answer is overdue: that request fails alone,
the connection goes on for the others, the late answer reaches the request's ``late``
handler, and only an answer a second timeout late drops the connection."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import Frame, MessageType
from signd.enclave.server import EnclaveServer
from signd.enclave.transport import InProcessTransport
from signd.errors import DependencyUnavailable
from tests.integration.support import wait_until

TIMEOUT = 0.3


class CountingTransport:
    """The in-process transport, counting the connections made."""

    def __init__(self, server: EnclaveServer) -> None:
        self._inner = InProcessTransport(server.serve_connection)
        self.connections = 0

    def connect(self, timeout: float) -> socket.socket:
        self.connections += 1
        return self._inner.connect(timeout)


class SlowHealth:
    """The enclave's handler, with each HEALTH answered after the next delay queued (else
    ``default``), or not until :attr:`released` while :attr:`hold` is set."""

    def __init__(self, server: EnclaveServer, default: float) -> None:
        self.handle = server.app.handle
        self.delays: deque[float] = deque()
        self.default = default
        self.hold = False
        self.released = threading.Event()

    def __call__(self, frame: Frame) -> bytes:
        if frame.message_type is MessageType.HEALTH:
            if self.hold:
                self.released.wait(10.0)
            else:
                time.sleep(self.delays.popleft() if self.delays else self.default)
        return self.handle(frame)


@pytest.fixture
def slow_health(server: EnclaveServer) -> Iterator[SlowHealth]:
    slow = SlowHealth(server, default=0.2)
    server.app.handle = slow  # type: ignore[method-assign]
    yield slow
    slow.released.set()
    server.app.handle = slow.handle  # type: ignore[method-assign]


@pytest.fixture
def counted(server: EnclaveServer) -> Iterator[tuple[EnclaveClient, CountingTransport]]:
    transport = CountingTransport(server)
    client = EnclaveClient(transport, timeout=TIMEOUT)  # type: ignore[arg-type]
    yield client, transport
    client.close()


def test_an_overdue_answer_fails_only_its_own_request(
    counted: tuple[EnclaveClient, CountingTransport], slow_health: SlowHealth
) -> None:
    """The first HEALTH is answered after 0.45 s, past its 0.3 s; five sent 0.1 s before its
    deadline, each answered 0.2 s later, are answered on the same connection."""
    client, transport = counted
    client.health()  # connected
    late: list[dict[str, Any]] = []
    slow_health.delays.append(1.5 * TIMEOUT)

    def ask() -> dict[str, Any] | Exception:
        try:
            return client.request(MessageType.HEALTH, {})
        except DependencyUnavailable as exc:
            return exc

    with ThreadPoolExecutor(max_workers=6) as pool:
        overdue = pool.submit(client.request, MessageType.HEALTH, {}, late=late.append)
        time.sleep(0.2)
        others = [pool.submit(ask) for _ in range(5)]
        with pytest.raises(DependencyUnavailable, match="did not answer within"):
            overdue.result()
        answers = [other.result() for other in others]
    assert [type(answer) for answer in answers] == [dict] * 5, answers
    wait_until(lambda: bool(late), timeout=5.0, what="the late answer")
    assert late[0]["status"] == "ok"
    assert client.health()["status"] == "ok"
    assert transport.connections == 1
    connection = client._connection
    assert connection is not None and not connection._pending  # nothing kept for it
    assert not connection._abandoned


def test_an_answer_overdue_by_a_second_timeout_drops_the_connection(
    counted: tuple[EnclaveClient, CountingTransport], slow_health: SlowHealth
) -> None:
    client, transport = counted
    client.health()
    connection = client._connection
    assert connection is not None
    slow_health.hold = True
    sent = time.monotonic()
    with pytest.raises(DependencyUnavailable, match="did not answer within"):
        client.request(MessageType.HEALTH, {})
    time.sleep(0.5 * TIMEOUT)
    assert not connection.closed  # one late answer is no sign that the enclave is gone
    wait_until(lambda: connection.closed, timeout=5.0, what="the connection dropped")
    # Checked whenever the reader wakes: at least once per timeout.
    assert 2 * TIMEOUT <= time.monotonic() - sent <= 3 * TIMEOUT + 0.5
    slow_health.hold = False
    slow_health.released.set()
    assert client.health()["status"] == "ok"
    assert transport.connections == 2
