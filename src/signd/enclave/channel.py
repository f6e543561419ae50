"""The host's side of the enclave protocol for an event loop: one pipelined connection whose
frames the loop writes and reads itself, so a request to the enclave costs no thread.

:class:`~signd.enclave.client.EnclaveClient` serves threads (a reader thread per connection,
answers as :class:`concurrent.futures.Future`); the service's hot path instead asks an
:class:`EnclaveChannel`, which writes each request with the loop's transport and settles an
:mod:`asyncio` future in ``data_received``. Only connecting, which may start the local
enclave, runs in a thread (``connect``'s caller passes one).

A request that could not be sent raises :class:`NotSent` (nothing reached the enclave, so the
caller may send it another way); once sent, a lost connection raises
:class:`~signd.enclave.client.ConnectionLost` and an overdue answer drops the connection and
raises :class:`~signd.errors.DependencyUnavailable`: the enclave may have acted on it, so it
is not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, cast

from signd.enclave.client import ConnectionLost, Link
from signd.enclave.protocol import (
    HELLO_VERSION,
    SUPPORTED_VERSIONS,
    U32_MAX,
    FrameDecoder,
    MessageType,
    ProtocolViolation,
    Reply,
    encode_frame,
    next_request_id,
    reply_to,
    require_int,
)
from signd.errors import DependencyUnavailable, SigndError

logger = logging.getLogger(__name__)

Connect = Callable[[Callable[[float], socket.socket], float], Awaitable[socket.socket]]
"""Runs the blocking ``transport.connect(timeout)`` in a thread: ``await connect(f, t)``."""
_Pending = tuple[MessageType, "asyncio.Future[dict[str, Any]]"]
CLOSED: Final = "the enclave connection was closed"


class NotSent(DependencyUnavailable):
    """The request never left: there is no connection, and none could be made."""


class _Protocol(asyncio.Protocol):
    """One connection: frames in, futures settled by request id."""

    def __init__(self, max_frame_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame_size=max_frame_size)
        self.pending: dict[int, _Pending] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.version = HELLO_VERSION

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            reply = reply_to(event, self.pending.get(event.request_id, (None, None))[0])
            if reply.broken is not None:
                if isinstance(event, ProtocolViolation):
                    logger.warning("enclave sent a garbled stream: %s", event.error.message)
                self.close(DependencyUnavailable(reply.broken))
                return
            self._settle(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(DependencyUnavailable("the enclave closed the connection"))

    def close(self, reason: SigndError) -> None:
        """Close the connection and fail every waiting request with ``reason``."""
        if self.closed:
            return
        self.closed = True
        pending, self.pending = self.pending, {}
        if self.loop.is_closed():  # its loop is gone, and its socket and waiters with it
            return
        if self.transport is not None:
            self.transport.close()
        for _, future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason.message))

    def _settle(self, reply: Reply) -> None:
        """Complete the request ``reply`` answers."""
        entry = self.pending.pop(reply.request_id, None)
        if entry is None:
            logger.warning("enclave answered unknown request id %d", reply.request_id)
            return
        future = entry[1]
        if future.done():  # its caller stopped waiting
            return
        if reply.error is not None:
            future.set_exception(reply.error)
        else:
            future.set_result(reply.body or {})


class EnclaveChannel:
    """Requests to the enclave from one event loop (not thread-safe: that loop only), over
    ``link`` (the same transport and limits as the threads' :class:`~signd.enclave.client.
    EnclaveClient`, whose :attr:`~signd.enclave.client.EnclaveClient.link` gives them). The
    connection is made on first use and again after it breaks.
    """

    def __init__(self, link: Link) -> None:
        self._transport = link.transport
        self.timeout = link.timeout
        self._connect_timeout = link.connect_timeout
        self._max_frame_size = link.max_frame_size
        self._protocol: _Protocol | None = None
        self._connecting: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._ids = itertools.cycle(range(1, U32_MAX + 1))

    def __repr__(self) -> str:
        return f"EnclaveChannel({self._transport!r})"

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    def close(self) -> None:
        """Close the connection (from its loop's thread, or once that loop has stopped)."""
        if self._protocol is not None:
            self._protocol.close(DependencyUnavailable(CLOSED))

    async def request(
        self, message_type: MessageType, body: Mapping[str, Any], connect: Connect
    ) -> dict[str, Any]:
        """Send one request and await its answer's body (an error frame raises its error)."""
        protocol = await self._connected(connect)
        return await self._exchange(protocol, message_type, body, self.timeout)

    async def _exchange(
        self,
        protocol: _Protocol,
        message_type: MessageType,
        body: Mapping[str, Any],
        timeout: float,
    ) -> dict[str, Any]:
        if protocol.closed or protocol.transport is None:
            raise NotSent(CLOSED)
        request_id = next_request_id(self._ids, protocol.pending)
        data = encode_frame(
            message_type,
            request_id,
            body,
            version=protocol.version,
            max_frame_size=self._max_frame_size,
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        protocol.pending[request_id] = (message_type, future)
        protocol.transport.write(data)

        def overdue() -> None:
            if not future.done():
                future.set_exception(
                    DependencyUnavailable(f"the enclave did not answer within {timeout:g} s")
                )
                protocol.close(DependencyUnavailable("the enclave stopped answering"))

        timer = loop.call_later(timeout, overdue)
        try:
            return await future
        finally:
            timer.cancel()
            protocol.pending.pop(request_id, None)

    async def _connected(self, connect: Connect) -> _Protocol:
        """The open connection of the running loop, or a new one (a connection made by
        another loop, such as a server started again in the same process, is left)."""
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is not None and not protocol.closed and protocol.loop is loop:
            return protocol
        if self._connecting is None or self._connecting[0] is not loop:
            self._connecting = (loop, asyncio.Lock())
        async with self._connecting[1]:
            protocol = self._protocol
            if protocol is not None and not protocol.closed and protocol.loop is loop:
                return protocol
            if protocol is not None and protocol.loop is not loop and not protocol.closed:
                with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                    protocol.loop.call_soon_threadsafe(
                        protocol.close, DependencyUnavailable(CLOSED)
                    )
            try:
                self._protocol = await self._open(connect)
            except SigndError as exc:
                raise NotSent(exc.message) from None
            return self._protocol

    async def _open(self, connect: Connect) -> _Protocol:
        """A new connection whose HELLO exchange is done."""
        sock = await connect(self._transport.connect, self._connect_timeout)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            if sock.family == socket.AF_UNIX:
                _, protocol = await loop.create_unix_connection(
                    lambda: _Protocol(self._max_frame_size), sock=sock
                )
            else:
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._max_frame_size), sock=sock
                )
        except OSError as exc:
            sock.close()
            raise DependencyUnavailable(f"could not use the enclave connection ({exc})") from None
        try:
            hello = await self._exchange(
                protocol,
                MessageType.HELLO,
                {"versions": sorted(SUPPORTED_VERSIONS)},
                self._connect_timeout,
            )
            version = require_int(hello, "version", minimum=0, maximum=255)
        except SigndError:
            protocol.close(DependencyUnavailable(CLOSED))
            raise
        if version not in SUPPORTED_VERSIONS:
            protocol.close(DependencyUnavailable(CLOSED))
            raise DependencyUnavailable(f"the enclave chose unknown version {version}")
        protocol.version = version
        return protocol
