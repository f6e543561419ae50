"""The host's side of the enclave protocol for an event loop: one pipelined connection whose
frames the loop writes and reads itself, so a request to the enclave costs no thread.

:class:`~signd.enclave.client.EnclaveClient` serves threads (a reader thread per connection,
answers as :class:`concurrent.futures.Future`); the service's hot path instead asks an
:class:`EnclaveChannel`, which writes each request with the loop's transport and settles an
:mod:`asyncio` future in ``data_received``. Only connecting, which may start the local
enclave, runs in a thread (``connect``'s caller passes one).

A request that could not be sent raises :class:`NotSent` (nothing reached the enclave, so the
caller may send it another way); once sent, a lost connection raises
:class:`~signd.enclave.client.ConnectionLost` and an answer not there within the timeout
raises :class:`~signd.errors.DependencyUnavailable`: the enclave may have acted on it, so it
is not sent again.

An overdue request fails alone: the connection stays up for the others in flight, and the
request stays *abandoned* under its id (which no new request takes) until its answer comes.
That answer goes to the request's ``late`` handler, if it has one (a GATE's sealed audit
records must still reach the log, in their place in the chain), and to no caller. Only an
answer a second timeout late (:data:`LATE_ANSWER_TIMEOUTS`) means the enclave has stopped
answering: then the connection is dropped, failing what waits on it, and the next request
connects again. A caller cancelled while it waits leaves its request abandoned the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from signd.enclave.client import (
    LATE_ANSWER_TIMEOUTS,
    STOPPED_ANSWERING,
    ConnectionLost,
    LateAnswer,
    Link,
    hand_late_answer,
)
from signd.enclave.protocol import (
    HELLO_VERSION,
    SUPPORTED_VERSIONS,
    U32_MAX,
    FrameDecoder,
    MessageType,
    ProtocolViolation,
    Reply,
    answer_frame_size,
    encode_frame,
    next_request_id,
    reply_to,
    require_int,
)
from signd.errors import DependencyUnavailable, SigndError

logger = logging.getLogger(__name__)

Connect = Callable[[Callable[[float], socket.socket], float], Awaitable[socket.socket]]
"""Runs the blocking ``transport.connect(timeout)`` in a thread: ``await connect(f, t)``."""
CLOSED: Final = "the enclave connection was closed"


@dataclass(slots=True)
class _Pending:
    """A request sent and not yet answered."""

    message_type: MessageType
    future: asyncio.Future[dict[str, Any]]
    late: LateAnswer | None
    abandoned: asyncio.TimerHandle | None = None
    """Once its caller stopped waiting: the timer that drops the connection if the answer
    has not come by then."""


class NotSent(DependencyUnavailable):
    """The request never left: there is no connection, and none could be made."""


class _Protocol(asyncio.Protocol):
    """One connection: frames in, futures settled by request id."""

    def __init__(self, max_frame_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame_size=answer_frame_size(max_frame_size))
        self.pending: dict[int, _Pending] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.version = HELLO_VERSION

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            waiting = self.pending.get(event.request_id)
            reply = reply_to(event, None if waiting is None else waiting.message_type)
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
        for entry in pending.values():
            if entry.abandoned is not None:
                entry.abandoned.cancel()
            if not entry.future.done():
                entry.future.set_exception(ConnectionLost(reason.message))

    def abandon(self, request_id: int, drop_at: float) -> None:
        """The caller of ``request_id`` stopped waiting: keep its id until the answer comes,
        and drop the connection if it has not come at ``drop_at`` (the loop's time)."""
        entry = self.pending.get(request_id)
        if entry is None or entry.abandoned is not None or self.closed:
            return

        def still_unanswered() -> None:
            if self.pending.get(request_id) is entry:
                logger.error(
                    "the enclave has not answered %s request %d for %d timeouts: "
                    "dropping the connection",
                    entry.message_type.name,
                    request_id,
                    LATE_ANSWER_TIMEOUTS,
                )
                self.close(DependencyUnavailable(STOPPED_ANSWERING))

        entry.abandoned = self.loop.call_at(drop_at, still_unanswered)

    def _settle(self, reply: Reply) -> None:
        """Complete the request ``reply`` answers (or hand a late answer to its handler)."""
        entry = self.pending.pop(reply.request_id, None)
        if entry is None:
            logger.warning("enclave answered unknown request id %d", reply.request_id)
            return
        if entry.abandoned is not None:  # its caller stopped waiting (its future is done)
            entry.abandoned.cancel()
            hand_late_answer(entry.message_type, entry.late, reply.error, reply.body)
        elif reply.error is not None:
            entry.future.set_exception(reply.error)
        else:
            entry.future.set_result(reply.body or {})


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
        self,
        message_type: MessageType,
        body: Mapping[str, Any],
        connect: Connect,
        *,
        late: LateAnswer | None = None,
    ) -> dict[str, Any]:
        """Send one request and await its answer's body (an error frame raises its error).

        ``late`` takes the answer's body if it comes after the caller stopped waiting
        (timed out or cancelled); otherwise that answer is dropped."""
        protocol = await self._connected(connect)
        return await self._exchange(protocol, message_type, body, self.timeout, late)

    async def _exchange(
        self,
        protocol: _Protocol,
        message_type: MessageType,
        body: Mapping[str, Any],
        timeout: float,
        late: LateAnswer | None = None,
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
        protocol.pending[request_id] = _Pending(message_type, future, late)
        protocol.transport.write(data)
        sent = loop.time()

        def overdue() -> None:
            if not future.done():
                future.set_exception(
                    DependencyUnavailable(f"the enclave did not answer within {timeout:g} s")
                )

        timer = loop.call_at(sent + timeout, overdue)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Answered as its caller was cancelled: the answer is late all the same.
                hand_late_answer(message_type, late, None, future.result())
            raise
        finally:
            timer.cancel()
            # Unanswered (overdue or cancelled): the enclave may still answer, and the
            # answer may carry what must not be lost, so the id stays taken until then.
            protocol.abandon(request_id, sent + LATE_ANSWER_TIMEOUTS * timeout)

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
