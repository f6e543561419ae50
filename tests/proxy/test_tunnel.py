"""End to end over Unix sockets: TCP client → forwarder → host proxy → TCP upstream."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from signd.proxy import Endpoint, ProxyTimeouts
from tests.proxy.conftest import BANNER, Tunnel, TunnelFactory, Upstreams

pytestmark = pytest.mark.integration


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def raw_proxy_request(tunnel: Tunnel, header: bytes, timeout: float = 5.0) -> bytes:
    """Talk to the host proxy directly; everything it answers up to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(tunnel.socket_path)
        if header:  # an empty send to a closed Unix socket peer raises EPIPE
            sock.sendall(header)
        return read_all(sock)


def assert_echo_works(tunnel: Tunnel, upstreams: Upstreams) -> None:
    with connect(tunnel.port_for(upstreams.echo)) as sock:
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""


def wait_until_idle(tunnel: Tunnel, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while tunnel.proxy.active_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tunnel.proxy.active_connections == 0


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The structured fields of the log records for ``event``."""
    return [vars(r) for r in caplog.records if vars(r).get("event") == event]


def test_small_round_trip(tunnel: Tunnel, upstreams: Upstreams) -> None:
    assert_echo_works(tunnel, upstreams)


def test_large_payload_echoed_both_ways(tunnel: Tunnel, upstreams: Upstreams) -> None:
    payload = os.urandom(16 * 1024 * 1024)
    with connect(tunnel.port_for(upstreams.echo)) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = read_all(sock)
        sender.join()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_half_close_reaches_the_upstream(
    tunnel: Tunnel, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    """The digest server answers only after EOF, so the half-close must travel through."""
    caplog.set_level(logging.INFO, logger="signd.proxy")
    payload = os.urandom(8 * 1024 * 1024)
    with connect(tunnel.port_for(upstreams.digest)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == hashlib.sha256(payload).digest()
    wait_until_idle(tunnel)
    closed = events(caplog, "proxy_closed")
    assert closed[-1]["bytes_sent"] == len(payload)
    assert closed[-1]["bytes_received"] == 32
    assert closed[-1]["destination"] == str(upstreams.digest)


def test_upstream_speaks_first_and_closes(tunnel: Tunnel, upstreams: Upstreams) -> None:
    with connect(tunnel.port_for(upstreams.banner)) as sock:
        assert read_all(sock) == BANNER


def test_many_concurrent_connections(tunnel: Tunnel, upstreams: Upstreams) -> None:
    port = tunnel.port_for(upstreams.digest)

    def one(index: int) -> bool:
        payload = os.urandom(64 * 1024) + index.to_bytes(4, "big")
        with connect(port) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock) == hashlib.sha256(payload).digest()

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)
    wait_until_idle(tunnel)


def test_connection_limit_answers_busy(
    make_tunnel: TunnelFactory, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    tunnel = make_tunnel([upstreams.echo], [upstreams.echo], max_connections=2)
    held = [connect(tunnel.port) for _ in range(2)]
    for sock in held:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    assert raw_proxy_request(tunnel, b"") == b"BUSY\n"
    with connect(tunnel.port) as refused:
        assert read_all(refused) == b""
    assert [r["reason"] for r in events(caplog, "proxy_refused")] == ["busy", "busy"]
    for sock in held:
        sock.close()
    wait_until_idle(tunnel)
    assert_echo_works(tunnel, upstreams)


def test_destination_not_on_allowlist_is_refused_and_logged(
    tunnel: Tunnel, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    forbidden = tunnel.forwarder.routes[-1].remote
    with connect(tunnel.port_for(forbidden)) as sock:
        sock.settimeout(5)
        assert read_all(sock) == b""
    refused = events(caplog, "proxy_refused")
    assert [(r["reason"], r["destination"]) for r in refused] == [
        ("not_allowlisted", str(forbidden))
    ]
    assert refused[0]["levelno"] == logging.WARNING
    assert events(caplog, "forwarder_refused")[0]["reason"] == "DENIED"
    assert not events(caplog, "proxy_connected")
    header = f"CONNECT {forbidden}\n".encode()
    assert raw_proxy_request(tunnel, header) == b"DENIED\n"
    assert_echo_works(tunnel, upstreams)


def test_allowlist_matches_host_case_insensitively_and_port_exactly(
    make_tunnel: TunnelFactory, upstreams: Upstreams
) -> None:
    tunnel = make_tunnel([Endpoint("LocalHost", upstreams.echo.port)], [upstreams.echo])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(tunnel.socket_path)
        sock.sendall(f"CONNECT LOCALHOST:{upstreams.echo.port}\n".encode() + b"hello")
        assert sock.recv(3) == b"OK\n"
        assert sock.recv(5) == b"hello"
    for other in (upstreams.digest.port, upstreams.echo.port + 1):
        assert raw_proxy_request(tunnel, f"CONNECT localhost:{other}\n".encode()) == b"DENIED\n"
    assert raw_proxy_request(tunnel, f"CONNECT {upstreams.echo}\n".encode()) == b"DENIED\n"


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT\n",
        b"CONNECT 127.0.0.1\n",
        b"CONNECT 127.0.0.1:0\n",
        b"CONNECT 127.0.0.1:99999\n",
        b"CONNECT bad host:443\n",
        b"CONNECT \xff\xfe:443\n",
        b"connect 127.0.0.1:443\n",
        b"CONNECT " + b"a" * 600 + b":443\n",
        b"partial header then EOF",
    ],
)
def test_malformed_header_is_refused_and_logged(
    tunnel: Tunnel, upstreams: Upstreams, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(tunnel.socket_path)
        sock.sendall(header)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"DENIED\n"
    assert [r["reason"] for r in events(caplog, "proxy_refused")] == ["malformed_header"]
    assert header.decode("latin-1")[:20] not in caplog.text
    assert_echo_works(tunnel, upstreams)


def test_oversized_header_is_refused(tunnel: Tunnel, upstreams: Upstreams) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(tunnel.socket_path)
        try:
            sock.sendall(b"A" * (1 << 20))
            answer = read_all(sock)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    assert answer in (b"DENIED\n", b"")
    assert_echo_works(tunnel, upstreams)


def test_silent_client_times_out(
    make_tunnel: TunnelFactory, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    timeouts = ProxyTimeouts(connect=1.0, handshake=0.3, idle=5.0, drain=5.0)
    tunnel = make_tunnel([upstreams.echo], [upstreams.echo], timeouts=timeouts)
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(tunnel.socket_path)
        assert read_all(sock) == b"DENIED\n"
    assert time.monotonic() - started < 2.0
    assert [r["reason"] for r in events(caplog, "proxy_refused")] == ["handshake_timeout"]
    assert_echo_works(tunnel, upstreams)


def test_idle_connection_is_closed_but_activity_keeps_it(
    make_tunnel: TunnelFactory, upstreams: Upstreams
) -> None:
    timeouts = ProxyTimeouts(connect=1.0, handshake=1.0, idle=0.5, drain=5.0)
    tunnel = make_tunnel([upstreams.echo], [upstreams.echo], timeouts=timeouts)
    with connect(tunnel.port) as sock:
        for _ in range(6):
            sock.sendall(b"k")
            assert sock.recv(1) == b"k"
            time.sleep(0.2)
        started = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - started < 2.0
    wait_until_idle(tunnel)


def test_upstream_down_closes_cleanly(
    tunnel: Tunnel, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    with connect(tunnel.port_for(upstreams.dead)) as sock:
        assert read_all(sock) == b""
    assert raw_proxy_request(tunnel, f"CONNECT {upstreams.dead}\n".encode()) == b"UNREACHABLE\n"
    reasons = [r["reason"] for r in events(caplog, "proxy_refused")]
    assert reasons == ["unreachable", "unreachable"]
    assert events(caplog, "forwarder_refused")[0]["reason"] == "UNREACHABLE"
    assert_echo_works(tunnel, upstreams)


def test_upstream_reset_mid_stream_closes_client(
    make_tunnel: TunnelFactory, upstreams: Upstreams
) -> None:
    """An upstream that resets mid-connection: the client sees a clean EOF, not a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = Endpoint("127.0.0.1", listener.getsockname()[1])
    tunnel = make_tunnel([upstream, upstreams.echo], [upstream, upstreams.echo])
    with listener, connect(tunnel.port) as sock:
        server_side, _ = listener.accept()
        sock.sendall(b"hello")
        assert server_side.recv(5) == b"hello"
        linger_zero = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # close() sends a reset
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
        server_side.close()
        assert read_all(sock) == b""
    wait_until_idle(tunnel)
    assert_echo_works(tunnel, upstreams)


def test_proxy_unreachable_closes_client(
    make_tunnel: TunnelFactory, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    tunnel = make_tunnel([upstreams.echo], [upstreams.echo])
    tunnel.loop.run(tunnel.proxy.close())
    with connect(tunnel.port) as sock:
        assert read_all(sock) == b""
    assert events(caplog, "forwarder_failed")[0]["reason"] == "proxy_unreachable"
