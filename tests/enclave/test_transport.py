"""Transports, the pipelined client and the socket server, end to end over real sockets."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.crypto.secp256k1 import recover_public_key
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import (
    HEADER,
    MAGIC,
    Flag,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    error_from_body,
)
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import (
    InProcessTransport,
    UnixAddress,
    UnixTransport,
    VsockAddress,
    VsockTransport,
    listen_socket,
    parse_address,
    transport_for,
)
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InvalidRequest,
    KeyNotFound,
    UnsupportedOperation,
)
from signd.storage.base import BlobStore
from tests.enclave.batch_blobs import range_of
from tests.enclave.fakes import MemoryBlobStore, MemoryKms, SlowBlobStore

DIGEST = b"\x11" * 32


@pytest.fixture
def socket_path() -> Iterator[str]:
    # AF_UNIX paths are limited to ~107 bytes, so pytest's tmp_path can be too long.
    path = f"/tmp/signd-test-{os.getpid()}-{time.monotonic_ns()}.sock"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def unix_server(
    socket_path: str, kms: MemoryKms, blobs: MemoryBlobStore
) -> Iterator[EnclaveServer]:
    server = start_enclave("unix://" + socket_path, kms, blobs)
    yield server
    server.close()


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(path)
    return sock


def read_frames(sock: socket.socket, count: int) -> tuple[list[object], bool]:
    """Read until ``count`` events arrived or the peer closed; (events, closed)."""
    decoder = FrameDecoder()
    events: list[object] = []
    while len(events) < count:
        data = sock.recv(65536)
        if not data:
            return events, True
        events += decoder.feed(data)
    return events, False


# --- addresses -------------------------------------------------------------------------------


def test_addresses_parse() -> None:
    assert parse_address("unix:///run/signd/enclave.sock") == UnixAddress("/run/signd/enclave.sock")
    assert parse_address("vsock://16:5000") == VsockAddress(16, 5000)
    assert parse_address("vsock://any:5000") == VsockAddress(socket.VMADDR_CID_ANY, 5000)
    assert str(parse_address("vsock://any:5000")) == "vsock://any:5000"
    assert str(parse_address("vsock://3:1")) == "vsock://3:1"
    assert str(parse_address("unix:///a/b")) == "unix:///a/b"


@pytest.mark.parametrize(
    "address",
    [
        "",
        "/tmp/x.sock",
        "tcp://1.2.3.4:5",
        "unix://",
        "vsock://16",
        "vsock://16:",
        "vsock://:5000",
        "vsock://-1:5000",
        "vsock://16:4294967296",
        "vsock://sixteen:5000",
    ],
)
def test_bad_addresses_are_configuration_errors(address: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(address)


def test_transport_for_picks_the_socket_family() -> None:
    vsock = transport_for("vsock://16:5000")
    assert isinstance(vsock, VsockTransport)
    assert vsock.family == socket.AF_VSOCK
    assert vsock.address == VsockAddress(16, 5000)
    unix = transport_for("unix:///tmp/x.sock")
    assert isinstance(unix, UnixTransport)
    assert unix.address.path == "/tmp/x.sock"


# --- vsock, through a socket pair ------------------------------------------------------------


def test_vsock_transport_speaks_the_protocol(
    monkeypatch: pytest.MonkeyPatch, server: EnclaveServer
) -> None:
    real_socket = socket.socket
    opened: list[object] = []

    class ConnectedVsock(real_socket):  # type: ignore[misc, valid-type]
        def connect(self, address: object) -> None:
            opened.append(address)

    def fake_socket(family: int = -1, type: int = -1, proto: int = -1, fileno: object = None):  # type: ignore[no-untyped-def]
        if family == socket.AF_VSOCK:
            opened.append((family, type))
            host_end, enclave_end = socket.socketpair()
            server.serve_connection(enclave_end)
            return ConnectedVsock(fileno=host_end.detach())
        return real_socket(family, type, proto, fileno)

    monkeypatch.setattr(socket, "socket", fake_socket)
    client = EnclaveClient(transport_for("vsock://16:5000"))
    try:
        [key] = client.create_keys("ethereum", 1)
        signature = client.sign_digest(key.reference, DIGEST)
    finally:
        client.close()
    assert opened == [(socket.AF_VSOCK, socket.SOCK_STREAM), (16, 5000)]
    assert recover_public_key(DIGEST, signature) == key.public_key


def test_unreachable_vsock_is_dependency_unavailable() -> None:
    client = EnclaveClient(VsockTransport(3, 9), connect_timeout=0.5)
    with pytest.raises(DependencyUnavailable):
        client.health()


# --- unix sockets end to end -----------------------------------------------------------------


def test_unix_socket_end_to_end(unix_server: EnclaveServer, socket_path: str) -> None:
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    client = EnclaveClient(transport_for("unix://" + socket_path))
    try:
        assert client.health()["status"] == "ok"
        keys = client.create_keys("ethereum", 100)
        assert len({k.address for k in keys}) == 100
        items = [(k.reference, bytes([i]) * 32) for i, k in enumerate(keys)]
        signatures = client.sign_digests(items)
        for (key, (_, digest)), signature in zip(
            zip(keys, items, strict=True), signatures, strict=True
        ):
            assert isinstance(signature, bytes)
            assert recover_public_key(digest, signature) == key.public_key
        assert client.flush_cache() == 100
    finally:
        client.close()


def test_pipelined_requests_share_one_connection(
    unix_server: EnclaveServer, socket_path: str
) -> None:
    client = EnclaveClient(transport_for("unix://" + socket_path))
    try:
        keys = client.create_keys("ethereum", 10)
        futures = [
            client.submit(
                MessageType.SIGN_DIGEST, {**keys[i % 10].reference.to_body(), "digest": DIGEST}
            )
            for i in range(200)
        ]
        for i, future in enumerate(futures):
            signature = future.result(timeout=10)["signature"]
            assert recover_public_key(DIGEST, signature) == keys[i % 10].public_key
        assert len(unix_server._connections) == 1
    finally:
        client.close()


def test_answers_are_matched_by_request_id_even_out_of_order(kms: MemoryKms) -> None:
    """The first request waits on its blob while the four after it are answered: each answer
    reaches its own caller. (The slow read waits for the test, not for a fixed time, so a
    loaded machine cannot reorder the answers.)"""
    blobs = SlowBlobStore()
    server = start_enclave(None, kms, blobs)
    client = EnclaveClient(InProcessTransport(server.serve_connection))
    try:
        [slow] = client.create_keys("ethereum", 1)
        fast = client.create_keys("ethereum", 4)
        blobs.slow.add(range_of(slow.blob).name)  # its batch blob holds only this key
        finished: list[str] = []
        futures = []
        for key in [slow, *fast]:
            future = client.submit(
                MessageType.SIGN_DIGEST, {**key.reference.to_body(), "digest": DIGEST}
            )
            future.add_done_callback(lambda _, k=key.key_id: finished.append(k))
            futures.append((key, future))
        for key, future in futures[1:]:
            assert (
                recover_public_key(DIGEST, future.result(timeout=5)["signature"]) == key.public_key
            )
        assert not futures[0][1].done()
        blobs.release.set()
        signature = futures[0][1].result(timeout=5)["signature"]
        assert recover_public_key(DIGEST, signature) == slow.public_key
        assert finished[-1] == slow.key_id
        assert sorted(finished[:-1]) == sorted(key.key_id for key in fast)
    finally:
        blobs.release.set()
        client.close()
        server.close()


def test_many_threads_share_one_client(unix_server: EnclaveServer, socket_path: str) -> None:
    client = EnclaveClient(transport_for("unix://" + socket_path))
    keys = client.create_keys("ethereum", 8)
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(25):
                sig = client.sign_digest(keys[index].reference, DIGEST)
                assert recover_public_key(DIGEST, sig) == keys[index].public_key
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert failures == []


def test_enclave_errors_arrive_as_the_same_class(client: EnclaveClient) -> None:
    [key] = client.create_keys("ethereum", 1)
    with pytest.raises(KeyNotFound):
        client.sign_digest(
            key.reference.__class__(key.key_id, key.chain, key.address, "enclave-nope"), DIGEST
        )
    with pytest.raises(InvalidRequest):
        client.request(MessageType.ERROR, {})
    results = client.sign_digests(
        [(key.reference, DIGEST), (key.reference.__class__("x", "ethereum", "0x0", "nope"), DIGEST)]
    )
    assert isinstance(results[0], bytes)
    assert isinstance(results[1], KeyNotFound)


# --- a server facing bad clients -------------------------------------------------------------


def test_garbage_gets_an_error_frame_and_a_close_while_others_are_served(
    unix_server: EnclaveServer, socket_path: str
) -> None:
    good = EnclaveClient(transport_for("unix://" + socket_path))
    try:
        [key] = good.create_keys("ethereum", 1)
        stalled = raw_connect(socket_path)
        stalled.sendall(encode_frame(MessageType.HEALTH, 1, {})[:10])
        bad = raw_connect(socket_path)
        bad.sendall(b"GET / HTTP/1.1\r\nHost: enclave\r\n\r\n")
        events, closed = read_frames(bad, 2)
        assert closed
        [event] = events
        assert isinstance(event, Frame)
        assert event.message_type is MessageType.ERROR
        assert event.request_id == 0
        assert isinstance(error_from_body(event.body), InvalidRequest)
        assert recover_public_key(DIGEST, good.sign_digest(key.reference, DIGEST)) == key.public_key
        stalled.close()
        bad.close()
    finally:
        good.close()


def test_oversized_frame_gets_an_error_for_its_request_then_a_close(
    unix_server: EnclaveServer, socket_path: str
) -> None:
    sock = raw_connect(socket_path)
    sock.sendall(HEADER.pack(MAGIC, 1, MessageType.SIGN_DIGEST, 0, 42, 0x7FFF_FFFF))
    events, closed = read_frames(sock, 2)
    assert closed
    [event] = events
    assert isinstance(event, Frame)
    assert event.request_id == 42
    assert isinstance(error_from_body(event.body), InvalidRequest)
    sock.close()


def test_unknown_type_and_version_are_answered_and_the_connection_stays(
    unix_server: EnclaveServer, socket_path: str
) -> None:
    sock = raw_connect(socket_path)
    payload = b"\xa0"
    sock.sendall(HEADER.pack(MAGIC, 1, 99, 0, 5, 1) + payload)
    sock.sendall(HEADER.pack(MAGIC, 7, MessageType.HEALTH, 0, 6, 1) + payload)
    sock.sendall(encode_frame(MessageType.HEALTH, 7, {}, flags=Flag.RESPONSE))
    sock.sendall(encode_frame(MessageType.HELLO, 8, {"versions": [5, 6]}))
    sock.sendall(encode_frame(MessageType.HEALTH, 9, {}))
    events, closed = read_frames(sock, 5)
    assert not closed
    by_id = {e.request_id: e for e in events if isinstance(e, Frame)}
    assert isinstance(error_from_body(by_id[5].body), UnsupportedOperation)
    assert isinstance(error_from_body(by_id[6].body), UnsupportedOperation)
    assert isinstance(error_from_body(by_id[7].body), InvalidRequest)
    assert isinstance(error_from_body(by_id[8].body), UnsupportedOperation)
    assert by_id[9].message_type is MessageType.HEALTH
    assert by_id[9].is_response
    assert by_id[9].body["status"] == "ok"
    sock.close()


# --- a client facing a gone, silent or garbled enclave ---------------------------------------


def test_enclave_gone_then_back(socket_path: str, kms: MemoryKms, blobs: MemoryBlobStore) -> None:
    address = "unix://" + socket_path
    server = start_enclave(address, kms, blobs)
    client = EnclaveClient(transport_for(address), timeout=2.0, connect_timeout=0.5)
    try:
        [key] = client.create_keys("ethereum", 1)
        server.close()
        with pytest.raises(DependencyUnavailable):
            client.sign_digest(key.reference, DIGEST)
        with pytest.raises(DependencyUnavailable):
            client.health()
        server = start_enclave(address, kms, blobs)
        assert (
            recover_public_key(DIGEST, client.sign_digest(key.reference, DIGEST)) == key.public_key
        )
    finally:
        client.close()
        server.close()


def _fake_enclave(path: str, reply: bytes | None) -> socket.socket:
    """A listener that accepts, reads, and answers ``reply`` once (or nothing at all)."""
    listener = listen_socket("unix://" + path)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.recv(65536)
        if reply is not None:
            conn.sendall(reply)
        time.sleep(2)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_a_silent_enclave_times_out(socket_path: str) -> None:
    listener = _fake_enclave(socket_path, None)
    client = EnclaveClient(UnixTransport(socket_path), timeout=0.3, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable, match="did not answer"):
        client.health()
    assert time.monotonic() - started < 2
    listener.close()


def test_a_garbled_enclave_is_dependency_unavailable(socket_path: str) -> None:
    listener = _fake_enclave(socket_path, b"\x00" * 64)
    client = EnclaveClient(UnixTransport(socket_path), connect_timeout=1.0)
    with pytest.raises(DependencyUnavailable):
        client.health()
    listener.close()


def test_an_enclave_answering_out_of_protocol_is_dependency_unavailable(socket_path: str) -> None:
    listener = _fake_enclave(
        socket_path, encode_frame(MessageType.HEALTH, 1, {}, flags=Flag.RESPONSE)
    )
    client = EnclaveClient(UnixTransport(socket_path), connect_timeout=1.0)
    with pytest.raises(DependencyUnavailable):
        client.health()
    listener.close()


def test_listening_refuses_a_live_socket_and_replaces_a_stale_one(
    unix_server: EnclaveServer, socket_path: str, kms: MemoryKms, blobs: BlobStore
) -> None:
    with pytest.raises(ConfigurationError, match="already listening"):
        start_enclave("unix://" + socket_path, kms, blobs)
    unix_server.close()
    assert not os.path.exists(socket_path)
    abandoned = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abandoned.bind(socket_path)
    abandoned.close()
    assert os.path.exists(socket_path)
    replacement = start_enclave("unix://" + socket_path, kms, blobs)
    client = EnclaveClient(UnixTransport(socket_path))
    assert client.health()["status"] == "ok"
    client.close()
    replacement.close()


def test_listening_on_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("x")
    with pytest.raises(ConfigurationError):
        listen_socket(f"unix://{path}")
