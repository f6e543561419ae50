"""A lost connection: idempotent requests are retried on a new one; key creation is not."""

from __future__ import annotations

import socket
import threading

import coincurve
import pytest

from signd.enclave.client import ConnectionLost, EnclaveClient
from signd.enclave.protocol import MessageType
from signd.enclave.server import EnclaveServer
from signd.enclave.transport import InProcessTransport

DIGEST = b"\x42" * 32


class DroppingTransport:
    """In-process transport that closes the next connection once ``armed`` requests arrive."""

    def __init__(self, server: EnclaveServer) -> None:
        self._inner = InProcessTransport(server.serve_connection)
        self.connections = 0
        self.drop_next = False
        self._open: list[socket.socket] = []

    def connect(self, timeout: float) -> socket.socket:
        self.connections += 1
        sock = self._inner.connect(timeout)
        self._open.append(sock)
        return sock

    def drop(self) -> None:
        """Cut every open connection, as an enclave dying would."""
        for sock in self._open:
            sock.shutdown(socket.SHUT_RDWR)
        self._open.clear()


def _dropping_request(
    client: EnclaveClient, transport: DroppingTransport, server: EnclaveServer
) -> None:
    """Make the next submit go out on a connection that is cut before it is answered: the
    server holds its answer until the cut, so a quick answer cannot win the race."""
    original = client._wait
    cut = threading.Event()
    handle = server.app.handle

    def answer_after_cut(frame):  # type: ignore[no-untyped-def]
        cut.wait(5.0)
        return handle(frame)

    def cut_then_wait(connection, request_id, future, timeout):  # type: ignore[no-untyped-def]
        client._wait = original  # type: ignore[method-assign]
        transport.drop()
        cut.set()
        server.app.handle = handle  # type: ignore[method-assign]
        return original(connection, request_id, future, timeout)

    server.app.handle = answer_after_cut  # type: ignore[method-assign]
    client._wait = cut_then_wait  # type: ignore[method-assign]


def test_sign_is_retried_on_a_new_connection(server: EnclaveServer) -> None:
    transport = DroppingTransport(server)
    client = EnclaveClient(transport, timeout=5.0)  # type: ignore[arg-type]
    try:
        [key] = client.create_keys("ethereum", 1)
        assert transport.connections == 1
        _dropping_request(client, transport, server)
        signature = client.sign_digest(key.reference, DIGEST)
        assert transport.connections == 2
        recovered = coincurve.PublicKey.from_signature_and_message(signature, DIGEST, hasher=None)
        assert recovered.format() == key.public_key
    finally:
        client.close()


def test_create_keys_is_not_retried(server: EnclaveServer) -> None:
    transport = DroppingTransport(server)
    client = EnclaveClient(transport, timeout=5.0)  # type: ignore[arg-type]
    try:
        client.health()
        _dropping_request(client, transport, server)
        with pytest.raises(ConnectionLost):
            client.request(MessageType.CREATE_KEYS, {"chain": "ethereum", "count": 1})
        assert transport.connections == 1
    finally:
        client.close()
