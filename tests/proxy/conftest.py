from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from signd.proxy import (
    Allowlist,
    EnclaveForwarder,
    Endpoint,
    HostProxy,
    ProxyTimeouts,
    Route,
    UnixAddress,
)
from tests.fixtures.servers import moto_server_fixture  # noqa: F401 - registers `moto_server`

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a background thread, so tests can use plain blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything, then pass the half-close on."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with the SHA-256 of what came (needs half-close to work)."""
    digest = hashlib.sha256()
    while chunk := await reader.read(65536):
        digest.update(chunk)
    writer.write(digest.digest())
    await writer.drain()
    writer.close()


BANNER = bytes(range(256)) * 16 * 1024  # 4 MiB


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Speak first: send 4 MiB, then close."""
    writer.write(BANNER)
    await writer.drain()
    writer.close()


@dataclass
class Upstreams:
    echo: Endpoint
    digest: Endpoint
    banner: Endpoint
    dead: Endpoint


@dataclass
class Tunnel:
    loop: LoopThread
    proxy: HostProxy
    forwarder: EnclaveForwarder
    socket_path: str

    @property
    def port(self) -> int:
        return self.forwarder.ports[0]

    def port_for(self, remote: Endpoint) -> int:
        index = [route.remote for route in self.forwarder.routes].index(remote)
        return self.forwarder.ports[index]


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="signd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def upstreams(loop_thread: LoopThread) -> Iterator[Upstreams]:
    servers: list[asyncio.Server] = []

    async def start() -> Upstreams:
        for handler in (_echo, _digest, _banner, _echo):
            servers.append(await asyncio.start_server(handler, "127.0.0.1", 0))
        ports = [server.sockets[0].getsockname()[1] for server in servers]
        dead = servers.pop()
        dead.close()
        await dead.wait_closed()
        return Upstreams(*(Endpoint("127.0.0.1", port) for port in ports))

    async def stop() -> None:
        for server in servers:
            server.close()
            await server.wait_closed()

    yield loop_thread.run(start())
    loop_thread.run(stop())


TunnelFactory = Callable[..., Tunnel]


@pytest.fixture
def make_tunnel(loop_thread: LoopThread, short_dir: Path) -> Iterator[TunnelFactory]:
    """Start a host proxy on a Unix socket and a forwarder with one route per remote."""
    started: list[Tunnel] = []

    def make(
        allowed: list[Endpoint],
        remotes: list[Endpoint],
        *,
        timeouts: ProxyTimeouts | None = None,
        max_connections: int = 256,
    ) -> Tunnel:
        socket_path = str(short_dir / f"proxy{len(started)}.sock")

        async def start() -> Tunnel:
            address = UnixAddress(socket_path)
            proxy = HostProxy(
                Allowlist(allowed), timeouts=timeouts, max_connections=max_connections
            )
            await proxy.start(address)
            routes = [Route(0, remote) for remote in remotes]
            forwarder = EnclaveForwarder(address, routes, timeouts=timeouts)
            await forwarder.start()
            return Tunnel(loop_thread, proxy, forwarder, socket_path)

        started.append(loop_thread.run(start()))
        return started[-1]

    yield make

    async def stop() -> None:
        for tunnel in started:
            await tunnel.forwarder.close()
            await tunnel.proxy.close()

    loop_thread.run(stop())


TEST_TIMEOUTS = ProxyTimeouts(connect=2.0, handshake=2.0, idle=30.0, drain=10.0)


@pytest.fixture
def tunnel(make_tunnel: TunnelFactory, upstreams: Upstreams) -> Tunnel:
    """Routes to echo, digest, banner, dead and a forbidden endpoint (in that order); the
    proxy allows all but the forbidden one."""
    forbidden = Endpoint("localhost", upstreams.echo.port)
    allowed = [upstreams.echo, upstreams.digest, upstreams.banner, upstreams.dead]
    return make_tunnel(allowed, [*allowed, forbidden], timeouts=TEST_TIMEOUTS)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
