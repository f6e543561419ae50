"""The event loop's channel to the enclave: pipelined requests without a thread, and the
failures a caller must tell apart (not sent, lost after sending, overdue)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from signd.enclave.channel import EnclaveChannel, NotSent, _Protocol
from signd.enclave.client import ConnectionLost, Link
from signd.enclave.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HELLO_VERSION,
    PROTOCOL_VERSION,
    Flag,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from signd.enclave.server import start_enclave
from signd.enclave.transport import UnixTransport
from signd.errors import ConfigurationError, DependencyUnavailable
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore


async def in_thread(open_socket: Callable[[float], socket.socket], timeout: float) -> socket.socket:
    return await asyncio.to_thread(open_socket, timeout)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="signd-channel-") as folder:
        yield Path(folder) / "enclave.sock"


def channel(path: Path, **options: Any) -> EnclaveChannel:
    return EnclaveChannel(Link(UnixTransport(str(path)), **options))


def test_pipelined_requests_against_the_enclave(tmp_path: Path, socket_path: Path) -> None:
    server = start_enclave(
        f"unix://{socket_path}", LocalKms(tmp_path), FilesystemBlobStore(tmp_path / "blobs")
    )
    try:

        async def main() -> None:
            link = channel(socket_path)
            answers = await asyncio.gather(
                *(link.request(MessageType.HEALTH, {}, in_thread) for _ in range(200))
            )
            assert all(answer["status"] == "ok" for answer in answers)
            assert link.connected
            with pytest.raises(ConfigurationError, match="not configured"):
                await link.request(MessageType.GATE, {"request": {}}, in_thread)
            assert link.connected  # an error frame answers one request; the link goes on
            link.close()
            assert not link.connected
            again = await link.request(MessageType.HEALTH, {}, in_thread)
            assert again["status"] == "ok"  # reconnected
            link.close()

        asyncio.run(main())
    finally:
        server.close()


def test_no_enclave_means_nothing_was_sent(socket_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(NotSent, match="unreachable"):
            await channel(socket_path).request(MessageType.HEALTH, {}, in_thread)

    asyncio.run(main())


Behaviour = Callable[[MessageType, int, asyncio.StreamWriter], Awaitable[bool]]
"""What a fake enclave does with a request after HELLO: False to hang up."""


async def fake_enclave(path: Path, behaviour: Behaviour, connections: list[int]) -> asyncio.Server:
    """A server that answers HELLO properly and then does ``behaviour``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                assert not isinstance(frame, Exception)
                if frame.message_type is MessageType.HELLO:
                    answer = {"version": PROTOCOL_VERSION, "max_batch": 10, "custody": ["enclave"]}
                    writer.write(
                        encode_frame(
                            MessageType.HELLO,
                            frame.request_id,
                            answer,
                            flags=Flag.RESPONSE,
                            version=HELLO_VERSION,
                        )
                    )
                elif not await behaviour(frame.message_type, frame.request_id, writer):
                    writer.close()
                    return

    return await asyncio.start_unix_server(serve, path=str(path))


def test_a_connection_lost_after_sending_is_not_retried(socket_path: Path) -> None:
    async def hang_up(message_type: MessageType, request_id: int, writer: Any) -> bool:
        return False

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, hang_up, connections)
        async with server:
            with pytest.raises(ConnectionLost):
                await channel(socket_path).request(MessageType.HEALTH, {}, in_thread)
        assert len(connections) == 1

    asyncio.run(main())


def answering_after(delays: dict[int, float], default: float = 0.05) -> Behaviour:
    """Answer each HEALTH after a delay: the n-th request (from 1) after ``delays[n]`` seconds
    (``default`` when not named), each on its own, as the enclave's worker pool would."""
    count = itertools.count(1)

    async def behaviour(message_type: MessageType, request_id: int, writer: Any) -> bool:
        delay = delays.get(next(count), default)

        async def answer() -> None:
            await asyncio.sleep(delay)
            body = {"status": "ok", "delay": delay}
            writer.write(encode_frame(message_type, request_id, body, flags=Flag.RESPONSE))

        tasks.add(asyncio.create_task(answer()))
        return True

    tasks: set[asyncio.Task[None]] = set()
    return behaviour


def test_an_overdue_answer_fails_only_its_own_request(socket_path: Path) -> None:
    """The first request is answered after 0.45 s, past its 0.3 s: it alone fails. Requests
    sent 0.1 s before its deadline, answered 0.2 s later, are still answered on the same
    connection, and the late answer goes to the request's ``late`` handler."""

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(
            socket_path, answering_after({1: 0.45}, default=0.2), connections
        )
        async with server:
            link = channel(socket_path, timeout=0.3)
            late: list[dict[str, Any]] = []
            slow = asyncio.create_task(
                link.request(MessageType.HEALTH, {}, in_thread, late=late.append)
            )
            await asyncio.sleep(0.2)
            others = [
                asyncio.create_task(link.request(MessageType.HEALTH, {}, in_thread))
                for _ in range(5)
            ]
            with pytest.raises(DependencyUnavailable, match=r"did not answer within 0\.3 s"):
                await slow
            answers = await asyncio.gather(*others, return_exceptions=True)
            assert answers == [{"status": "ok", "delay": 0.2}] * 5
            assert link.connected
            await asyncio.sleep(0.5)
            assert late == [{"status": "ok", "delay": 0.45}]
            assert await link.request(MessageType.HEALTH, {}, in_thread) == answers[0]
            assert len(connections) == 1
            assert link._protocol is not None and not link._protocol.pending  # nothing kept
            link.close()

    asyncio.run(main())


def test_an_answer_overdue_by_a_second_timeout_drops_the_connection(socket_path: Path) -> None:
    """An enclave that does not answer at all: each caller fails after its timeout; once an
    answer is a second timeout late, the connection is dropped (and every request still
    waiting on it fails), and the next request connects again."""

    async def never_answer(message_type: MessageType, request_id: int, writer: Any) -> bool:
        return True

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, never_answer, connections)
        async with server:
            link = channel(socket_path, timeout=0.3)
            with pytest.raises(DependencyUnavailable, match="did not answer within"):
                await link.request(MessageType.HEALTH, {}, in_thread)
            assert link.connected  # one late answer is no sign that the enclave is gone
            await asyncio.sleep(0.1)  # its second timeout ends before the next one's first
            waiting = asyncio.create_task(link.request(MessageType.HEALTH, {}, in_thread))
            with pytest.raises(ConnectionLost, match="stopped answering"):
                await waiting  # the first request's second timeout came before this one's
            assert not link.connected
            with pytest.raises(DependencyUnavailable):
                await link.request(MessageType.HEALTH, {}, in_thread)
        assert len(connections) == 2  # the third request connected again

    asyncio.run(main())


def test_a_caller_that_stops_waiting_leaves_the_connection_up(socket_path: Path) -> None:
    """A cancelled caller's answer still arrives, goes to its ``late`` handler, and does not
    count as an answer out of protocol."""

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, answering_after({1: 0.3}), connections)
        async with server:
            link = channel(socket_path, timeout=2.0)
            late: list[dict[str, Any]] = []
            task = asyncio.create_task(
                link.request(MessageType.HEALTH, {}, in_thread, late=late.append)
            )
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.sleep(0.4)
            assert late == [{"status": "ok", "delay": 0.3}]
            assert link.connected
            assert await link.request(MessageType.HEALTH, {}, in_thread) == {
                "status": "ok",
                "delay": 0.05,
            }
            assert len(connections) == 1
            link.close()

    asyncio.run(main())


def test_a_garbled_stream_fails_what_waits(socket_path: Path) -> None:
    async def garble(message_type: MessageType, request_id: int, writer: Any) -> bool:
        writer.write(b"this is not a frame of the enclave protocol")
        return True

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, garble, connections)
        async with server:
            link = channel(socket_path)
            with pytest.raises(ConnectionLost, match="garbled"):
                await link.request(MessageType.HEALTH, {}, in_thread)
            assert not link.connected

    asyncio.run(main())


def test_an_answer_of_another_type_closes_the_connection(socket_path: Path) -> None:
    async def wrong_type(message_type: MessageType, request_id: int, writer: Any) -> bool:
        writer.write(encode_frame(MessageType.HELLO, request_id, {}, flags=Flag.RESPONSE))
        return True

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, wrong_type, connections)
        async with server:
            with pytest.raises(ConnectionLost, match="out of protocol"):
                await channel(socket_path).request(MessageType.HEALTH, {}, in_thread)

    asyncio.run(main())


def test_an_answer_that_meets_its_callers_cancellation_goes_to_late() -> None:
    """The answer settles the request in the same pass of the loop as its caller is
    cancelled: the caller sees the cancellation, so the answer is late all the same."""

    class Written:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.frames.append(data)

        def close(self) -> None:
            pass

    async def main() -> None:
        protocol = _Protocol(DEFAULT_MAX_FRAME_SIZE)
        written = Written()
        protocol.transport = cast(asyncio.Transport, written)
        late: list[dict[str, Any]] = []
        link = channel(Path("unused.sock"))
        task = asyncio.create_task(
            link._exchange(protocol, MessageType.HEALTH, {}, 5.0, late.append)
        )
        await asyncio.sleep(0)
        [request] = FrameDecoder().feed(written.frames[0])
        assert not isinstance(request, Exception)
        answer = {"status": "ok"}
        protocol.data_received(
            encode_frame(MessageType.HEALTH, request.request_id, answer, flags=Flag.RESPONSE)
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert late == [answer]
        assert not protocol.pending

    asyncio.run(main())
