"""Inside the enclave: local TCP ports that lead, through the host proxy, to one remote each.

Like ``socat TCP-LISTEN:PORT,fork VSOCK-CONNECT:3:8000`` plus the proxy header: boto3 or
psycopg connect to ``127.0.0.1:PORT`` (for TLS, map the service's host name to 127.0.0.1 in
``/etc/hosts`` so certificates still match) and reach the real service.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from signd.errors import ConfigurationError, DependencyUnavailable, InvalidField, InvalidRequest
from signd.proxy.address import ProxyAddress, open_connection, parse_address
from signd.proxy.allowlist import Endpoint
from signd.proxy.protocol import Reply, encode_connect, parse_reply
from signd.proxy.splice import ProxyTimeouts, close_writers, splice

logger = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Route:
    """``127.0.0.1:local_port`` inside the enclave leads to ``remote`` (0 picks a free port)."""

    local_port: int
    remote: Endpoint

    @classmethod
    def parse(cls, text: str) -> Route:
        """``LOCAL_PORT:host:port``, e.g. ``8443:kms.us-east-1.amazonaws.com:443``."""
        local, sep, remote = text.partition(":")
        try:
            if not sep or not local.isdecimal() or not 0 <= int(local) < 65536:
                raise InvalidField("bad local port", field="route")
            return cls(int(local), Endpoint.parse(remote))
        except InvalidField:
            raise ConfigurationError(f"route must be LOCAL_PORT:HOST:PORT: {text!r}") from None

    def __str__(self) -> str:
        return f"{self.local_port}:{self.remote}"


class EnclaveForwarder:
    """One TCP listener per route; each connection is tunnelled through the host proxy."""

    def __init__(
        self,
        proxy: ProxyAddress,
        routes: Sequence[Route],
        *,
        timeouts: ProxyTimeouts | None = None,
    ) -> None:
        if not routes:
            raise ConfigurationError("the enclave forwarder needs at least one route")
        self.proxy = proxy
        self.routes = tuple(routes)
        self.timeouts = timeouts or ProxyTimeouts()
        self._ids = itertools.count(1)
        self._servers: list[asyncio.Server] = []

    @property
    def ports(self) -> tuple[int, ...]:
        """The bound local port of each route, in route order."""
        return tuple(int(s.sockets[0].getsockname()[1]) for s in self._servers)

    async def start(self) -> None:
        try:
            for route in self.routes:
                server = await asyncio.start_server(
                    functools.partial(self._handle, route),
                    LISTEN_HOST,
                    route.local_port,
                )
                self._servers.append(server)
        except OSError as exc:
            await self.close()
            raise ConfigurationError(f"cannot listen for route {route}: {exc.strerror}") from exc
        for route, port in zip(self.routes, self.ports, strict=True):
            logger.info(
                "forwarding %s:%d to %s via %s",
                LISTEN_HOST,
                port,
                route.remote,
                self.proxy,
                extra={"event": "forwarder_listening", "port": port, "remote": str(route.remote)},
            )

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self._servers))

    async def close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()

    async def _handle(
        self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn_id = next(self._ids)
        fields = {"conn_id": conn_id, "remote": str(route.remote)}
        try:
            upstream = await open_connection(self.proxy, timeout=self.timeouts.connect)
        except DependencyUnavailable:
            logger.warning(
                "host proxy %s unreachable",
                self.proxy,
                extra={"event": "forwarder_failed", "reason": "proxy_unreachable", **fields},
            )
            await close_writers(writer)
            return
        try:
            reply = await self._handshake(route, upstream)
            if reply is Reply.OK:
                await splice((reader, writer), upstream, self.timeouts)
            else:
                logger.warning(
                    "host proxy refused %s: %s",
                    route.remote,
                    reply.value,
                    extra={"event": "forwarder_refused", "reason": reply.value, **fields},
                )
        except (OSError, TimeoutError, asyncio.IncompleteReadError, InvalidRequest) as exc:
            logger.warning(
                "forwarded connection to %s failed: %s",
                route.remote,
                type(exc).__name__,
                extra={"event": "forwarder_failed", "reason": type(exc).__name__, **fields},
            )
        finally:
            await close_writers(upstream[1], writer)

    async def _handshake(
        self, route: Route, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    ) -> Reply:
        upstream[1].write(encode_connect(route.remote))
        async with asyncio.timeout(self.timeouts.handshake + self.timeouts.connect):
            await upstream[1].drain()
            return parse_reply(await upstream[0].readuntil(b"\n"))


async def serve_enclave_forwarders(proxy: ProxyAddress, routes: Sequence[Route]) -> None:
    """Run the forwarders until cancelled."""
    forwarder = EnclaveForwarder(proxy, routes)
    await forwarder.start()
    try:
        await forwarder.serve_forever()
    finally:
        await forwarder.close()


def run_enclave_forwarders(proxy: str, routes: list[Route]) -> None:
    """Blocking entry point for ``signd proxy enclave``: serve until interrupted."""
    asyncio.run(serve_enclave_forwarders(parse_address(proxy), routes))
