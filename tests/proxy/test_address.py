"""Transport addresses, and the vsock path as far as this machine allows (no vsock loopback)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from signd.errors import ConfigurationError, DependencyUnavailable
from signd.proxy import Allowlist, HostProxy, Route, UnixAddress, VsockAddress, parse_address
from signd.proxy.address import open_connection, start_server, vsock_listener


def _vsock_available() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (AttributeError, OSError):
        return False
    return True


needs_vsock = pytest.mark.skipif(not _vsock_available(), reason="AF_VSOCK not available")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///run/signd/proxy.sock", UnixAddress("/run/signd/proxy.sock")),
        ("vsock://3:8000", VsockAddress(3, 8000)),
        ("vsock://4294967295:5005", VsockAddress(socket.VMADDR_CID_ANY, 5005)),
    ],
)
def test_parse_address(text: str, expected: object) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/run/proxy.sock",
        "unix://relative.sock",
        "unix://",
        "vsock://3",
        "vsock://:8000",
        "vsock://3:",
        "vsock://-1:8000",
        "vsock://3:80x",
        "vsock://4294967296:1",
        "vsock://3:8000:1",
        "tcp://127.0.0.1:8000",
        "VSOCK://3:8000",
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "port", "remote"),
    [
        ("8443:kms.us-east-1.amazonaws.com:443", 8443, "kms.us-east-1.amazonaws.com:443"),
        ("0:[::1]:5432", 0, "[::1]:5432"),
    ],
)
def test_route_parse(text: str, port: int, remote: str) -> None:
    route = Route.parse(text)
    assert (route.local_port, str(route.remote)) == (port, remote)
    assert str(route) == text


@pytest.mark.parametrize("text", ["", "8443", "x:h:1", "70000:h:1", "1:h", "1:bad host:2"])
def test_route_parse_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Route.parse(text)


ANY_PORT = VsockAddress(socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY)


@needs_vsock
def test_vsock_listener_binds_af_vsock() -> None:
    with vsock_listener(ANY_PORT) as sock:
        assert sock.family == socket.AF_VSOCK
        assert sock.type == socket.SOCK_STREAM
        cid, port = sock.getsockname()
        assert cid == socket.VMADDR_CID_ANY
        assert port != socket.VMADDR_PORT_ANY
        assert not sock.getblocking()


@needs_vsock
def test_host_proxy_listens_on_vsock() -> None:
    async def scenario() -> tuple[int, tuple[int, int]]:
        proxy = HostProxy(Allowlist([]))
        await proxy.start(ANY_PORT)
        assert proxy._server is not None
        (sock,) = proxy._server.sockets
        result = (sock.family, sock.getsockname())
        await proxy.close()
        return result

    family, (cid, _) = asyncio.run(scenario())
    assert family == socket.AF_VSOCK
    assert cid == socket.VMADDR_CID_ANY


@needs_vsock
def test_vsock_port_in_use_is_a_configuration_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with vsock_listener(ANY_PORT) as taken:
        address = VsockAddress(socket.VMADDR_CID_ANY, taken.getsockname()[1])
        with pytest.raises(ConfigurationError):
            asyncio.run(start_server(handler, address))


@needs_vsock
def test_vsock_connect_failure_is_dependency_unavailable() -> None:
    """No enclave at CID 3 here: the connect fails or times out, translated and bounded."""

    async def scenario() -> None:
        await open_connection(VsockAddress(3, 5005), timeout=0.5)

    with pytest.raises(DependencyUnavailable):
        asyncio.run(asyncio.wait_for(scenario(), 5))


def test_unix_connect_failure_is_dependency_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable):
        asyncio.run(open_connection(UnixAddress(str(tmp_path / "none.sock")), timeout=1))


def test_listening_where_impossible_is_a_configuration_error(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    address = UnixAddress(str(tmp_path / "missing-dir" / "p.sock"))
    with pytest.raises(ConfigurationError):
        asyncio.run(start_server(handler, address))
