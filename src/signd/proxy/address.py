"""The host↔enclave transport address: ``unix:///path`` locally, ``vsock://CID:PORT`` on Nitro.

Everything that depends on the transport choice lives here: parsing, listening and
connecting, all as asyncio streams so the proxy code above cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from signd.errors import ConfigurationError, DependencyUnavailable

_MAX_VSOCK_NUMBER: Final = 0xFFFFFFFF

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """``cid`` 4294967295 (``VMADDR_CID_ANY``) listens on every CID; the parent is CID 3."""

    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"


ProxyAddress = UnixAddress | VsockAddress


def parse_address(text: str) -> ProxyAddress:
    """``unix:///absolute/path`` or ``vsock://CID:PORT`` (decimal numbers)."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "unix":
        if not rest.startswith("/") or "\x00" in rest:
            raise ConfigurationError(f"unix address needs an absolute path: {text!r}")
        return UnixAddress(rest)
    if sep and scheme == "vsock":
        cid, colon, port = rest.partition(":")
        if colon and cid.isdecimal() and port.isdecimal():
            cid_number, port_number = int(cid), int(port)
            if cid_number <= _MAX_VSOCK_NUMBER and port_number <= _MAX_VSOCK_NUMBER:
                return VsockAddress(cid_number, port_number)
        raise ConfigurationError(f"vsock address must be vsock://CID:PORT: {text!r}")
    raise ConfigurationError(f"proxy address must be unix:///path or vsock://CID:PORT: {text!r}")


def vsock_listener(address: VsockAddress, *, backlog: int = 128) -> socket.socket:
    """A bound, listening, non-blocking AF_VSOCK stream socket."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((address.cid, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_server(handler: StreamHandler, address: ProxyAddress) -> asyncio.Server:
    """An asyncio stream server on ``address`` (a stale Unix socket file is replaced)."""
    try:
        if isinstance(address, UnixAddress):
            return await asyncio.start_unix_server(handler, path=address.path)
        return await asyncio.start_server(handler, sock=vsock_listener(address))
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {address}: {exc.strerror}") from exc


async def open_connection(
    address: ProxyAddress, *, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``address`` within ``timeout`` seconds, or raise DependencyUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            if isinstance(address, UnixAddress):
                return await asyncio.open_unix_connection(address.path)
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock)
    except (OSError, TimeoutError) as exc:
        raise DependencyUnavailable(f"cannot reach the proxy at {address}") from exc
