"""The host side of the enclave's outbound path, like AWS ``vsock-proxy``.

It listens on a Unix socket (locally) or AF_VSOCK (Nitro). Each connection starts with a
``CONNECT host:port`` line (see :mod:`signd.proxy.protocol`); the proxy checks the
allowlist, connects to the destination over TCP, answers, and then splices bytes both ways.
Every decision is logged with structured fields (``event``, ``conn_id``, ``destination``,
``reason``, byte counts); payloads never are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from signd.errors import ConfigurationError, InvalidRequest
from signd.proxy.address import ProxyAddress, parse_address, start_server
from signd.proxy.allowlist import Allowlist, Endpoint
from signd.proxy.protocol import Reply, parse_connect
from signd.proxy.splice import ProxyTimeouts, close_writers, splice

logger = logging.getLogger(__name__)


class HostProxy:
    """An allowlisting forward proxy; connections beyond ``max_connections`` get ``BUSY``."""

    def __init__(
        self,
        allowlist: Allowlist,
        *,
        timeouts: ProxyTimeouts | None = None,
        max_connections: int = 256,
    ) -> None:
        self.allowlist = allowlist
        self.timeouts = timeouts or ProxyTimeouts()
        self.max_connections = max_connections
        self.active_connections = 0
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None

    async def start(self, listen: ProxyAddress) -> None:
        self._server = await start_server(self._handle, listen)
        logger.info(
            "host proxy listening on %s",
            listen,
            extra={
                "event": "proxy_listening",
                "listen": str(listen),
                "allowed": len(self.allowlist),
            },
        )

    async def serve_forever(self) -> None:
        if self._server is None:
            raise ConfigurationError("the host proxy was not started")
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._ids)
        if self.active_connections >= self.max_connections:
            _log_refusal(conn_id, "busy")
            await _answer_and_close(writer, Reply.BUSY)
            return
        self.active_connections += 1
        try:
            await self._serve(conn_id, reader, writer)
        except Exception:
            logger.exception(
                "proxy connection failed", extra={"event": "proxy_error", "conn_id": conn_id}
            )
        finally:
            self.active_connections -= 1
            await close_writers(writer)

    async def _serve(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        destination = await self._read_destination(conn_id, reader)
        if destination is None:
            await _answer_and_close(writer, Reply.DENIED)
            return
        if not self.allowlist.allows(destination):
            _log_refusal(conn_id, "not_allowlisted", destination)
            await _answer_and_close(writer, Reply.DENIED)
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(destination.host, destination.port),
                self.timeouts.connect,
            )
        except (OSError, TimeoutError) as exc:
            _log_refusal(conn_id, "unreachable", destination, error=type(exc).__name__)
            await _answer_and_close(writer, Reply.UNREACHABLE)
            return
        fields: dict[str, Any] = {"conn_id": conn_id, "destination": str(destination)}
        logger.info(
            "proxy connected to %s", destination, extra={"event": "proxy_connected", **fields}
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = "closed"
        try:
            writer.write(Reply.OK.encode())
            transfer = await splice((reader, writer), upstream, self.timeouts)
            fields.update(bytes_sent=transfer.sent, bytes_received=transfer.received)
        except (OSError, TimeoutError) as exc:
            outcome = type(exc).__name__
        finally:
            await close_writers(upstream[1])
        logger.info(
            "proxy connection to %s ended: %s",
            destination,
            outcome,
            extra={
                "event": "proxy_closed",
                "outcome": outcome,
                "duration": round(loop.time() - started, 3),
                **fields,
            },
        )

    async def _read_destination(
        self, conn_id: int, reader: asyncio.StreamReader
    ) -> Endpoint | None:
        """The destination from the header line, or None (logged) if there is none."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self.timeouts.handshake)
            return parse_connect(line)
        except TimeoutError:
            _log_refusal(conn_id, "handshake_timeout")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, InvalidRequest):
            _log_refusal(conn_id, "malformed_header")
        except OSError as exc:
            _log_refusal(conn_id, "client_error", error=type(exc).__name__)
        return None


def _log_refusal(
    conn_id: int, reason: str, destination: Endpoint | None = None, **fields: str
) -> None:
    logger.warning(
        "proxy refused connection %d%s: %s",
        conn_id,
        f" to {destination}" if destination else "",
        reason,
        extra={
            "event": "proxy_refused",
            "conn_id": conn_id,
            "reason": reason,
            "destination": str(destination) if destination else None,
            **fields,
        },
    )


async def _answer_and_close(writer: asyncio.StreamWriter, reply: Reply) -> None:
    """Send a one-line answer (best effort) and close the stream."""
    if not writer.is_closing():
        writer.write(reply.encode())
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except (OSError, TimeoutError):
            return
    await close_writers(writer)


async def serve_host_proxy(listen: ProxyAddress, allowlist: Allowlist) -> None:
    """Run a host proxy until cancelled."""
    proxy = HostProxy(allowlist)
    await proxy.start(listen)
    try:
        await proxy.serve_forever()
    finally:
        await proxy.close()


def run_host_proxy(listen: str, allowlist: Allowlist) -> None:
    """Blocking entry point for ``signd proxy host``: serve until interrupted."""
    asyncio.run(serve_host_proxy(parse_address(listen), allowlist))
