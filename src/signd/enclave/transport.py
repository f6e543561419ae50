"""How bytes get between host and enclave: AF_VSOCK (Nitro), a Unix socket (local), in-process.

A :class:`Transport` only opens a connected stream socket; framing, pipelining and reconnects
live in :class:`signd.enclave.client.EnclaveClient` and are the same for every transport, so
tests swap the transport and nothing else. Addresses are ``unix:///path/to/socket`` (the local
default) or ``vsock://CID:PORT`` (``vsock://any:PORT`` to listen on every CID).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from signd.errors import ConfigurationError, DependencyUnavailable

UNIX_SCHEME: Final = "unix://"
VSOCK_SCHEME: Final = "vsock://"
_U32_MAX: Final = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return UNIX_SCHEME + self.path


@dataclass(frozen=True, slots=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        cid = "any" if self.cid == socket.VMADDR_CID_ANY else str(self.cid)
        return f"{VSOCK_SCHEME}{cid}:{self.port}"


EnclaveAddress = UnixAddress | VsockAddress


def _u32(text: str, what: str, address: str) -> int:
    if not text.isdigit() or int(text) > _U32_MAX:
        raise ConfigurationError(f"{what} in enclave address {address!r} must be a u32")
    return int(text)


def parse_address(address: str) -> EnclaveAddress:
    """Parse ``unix:///path`` or ``vsock://CID:PORT``; anything else is a ConfigurationError."""
    if address.startswith(UNIX_SCHEME):
        path = address[len(UNIX_SCHEME) :]
        if not path or "\0" in path:
            raise ConfigurationError(f"enclave address {address!r} has no socket path")
        return UnixAddress(path)
    if address.startswith(VSOCK_SCHEME):
        cid_text, sep, port_text = address[len(VSOCK_SCHEME) :].partition(":")
        if not sep:
            raise ConfigurationError(f"enclave address {address!r} must be vsock://CID:PORT")
        cid = socket.VMADDR_CID_ANY if cid_text == "any" else _u32(cid_text, "CID", address)
        return VsockAddress(cid, _u32(port_text, "port", address))
    raise ConfigurationError(
        f"enclave address {address!r} must start with {UNIX_SCHEME} or {VSOCK_SCHEME}"
    )


class SocketUnavailable(DependencyUnavailable):
    """This process could not make a socket to reach the enclave with (it is out of file
    descriptors, or of memory): says nothing about the enclave itself."""


class Transport(Protocol):
    """Opens a connected stream socket to the enclave."""

    def connect(self, timeout: float) -> socket.socket:
        """A new connection; an unreachable enclave raises DependencyUnavailable, a socket
        this process cannot make :class:`SocketUnavailable`."""
        ...


def _connect(
    family: int, target: str | tuple[int, int], label: str, timeout: float
) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise SocketUnavailable(
            f"no socket to reach the enclave at {label} with"
            f" ({error.strerror or type(error).__name__})"
        ) from None
    try:
        sock.settimeout(timeout)
        sock.connect(target)
    except OSError as error:
        sock.close()
        raise DependencyUnavailable(
            f"enclave at {label} is unreachable ({error.strerror or type(error).__name__})"
        ) from None
    return sock


class UnixTransport:
    """A Unix-domain stream socket: the local enclave process."""

    def __init__(self, path: str) -> None:
        self.address = UnixAddress(path)

    def connect(self, timeout: float) -> socket.socket:
        return _connect(socket.AF_UNIX, self.address.path, str(self.address), timeout)

    def __repr__(self) -> str:
        return f"UnixTransport({self.address})"


class VsockTransport:
    """AF_VSOCK to a Nitro Enclave: the parent instance reaches the enclave's CID and port."""

    family: Final = socket.AF_VSOCK

    def __init__(self, cid: int, port: int) -> None:
        self.address = VsockAddress(cid, port)

    def connect(self, timeout: float) -> socket.socket:
        target = (self.address.cid, self.address.port)
        return _connect(self.family, target, str(self.address), timeout)

    def __repr__(self) -> str:
        return f"VsockTransport({self.address})"


ConnectionHandler = Callable[[socket.socket], None]
"""Takes ownership of a connected socket and serves it in the background."""


class InProcessTransport:
    """An enclave server in this process, reached through a socket pair (same codec, no files)."""

    def __init__(self, serve_connection: ConnectionHandler) -> None:
        self._serve_connection = serve_connection

    def connect(self, timeout: float) -> socket.socket:
        host_end, enclave_end = socket.socketpair()
        try:
            self._serve_connection(enclave_end)
        except Exception:
            host_end.close()
            enclave_end.close()
            raise
        host_end.settimeout(timeout)
        return host_end

    def __repr__(self) -> str:
        return "InProcessTransport()"


def transport_for(address: str) -> Transport:
    """The transport that reaches an enclave listening on ``address``."""
    parsed = parse_address(address)
    if isinstance(parsed, UnixAddress):
        return UnixTransport(parsed.path)
    return VsockTransport(parsed.cid, parsed.port)


def _remove_stale_unix_socket(path: str) -> None:
    """Unlink a socket file left by a dead server; refuse to steal a live one's."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise ConfigurationError(f"another enclave server is already listening on {path}")


def listen_socket(address: str, *, backlog: int = 128) -> socket.socket:
    """A listening socket for ``address``; a Unix socket file is made owner-only."""
    parsed = parse_address(address)
    if isinstance(parsed, UnixAddress):
        _remove_stale_unix_socket(parsed.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[int, int] = parsed.path
    else:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        target = (parsed.cid, parsed.port)
    try:
        sock.bind(target)
        if isinstance(parsed, UnixAddress):
            os.chmod(parsed.path, 0o600)
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {address} ({error.strerror or type(error).__name__})"
        ) from None
    return sock


def close_socket(sock: socket.socket) -> None:
    """Shut a socket down both ways (waking any reader) and close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
