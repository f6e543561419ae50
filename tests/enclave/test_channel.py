"""The event loop's channel to the enclave: pipelined requests without a thread, and the
failures a caller must tell apart (not sent, lost after sending, overdue)."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signd.enclave.channel import EnclaveChannel, NotSent
from signd.enclave.client import ConnectionLost, Link
from signd.enclave.protocol import (
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


def test_an_overdue_answer_drops_the_connection(socket_path: Path) -> None:
    async def never_answer(message_type: MessageType, request_id: int, writer: Any) -> bool:
        return True

    async def main() -> None:
        connections: list[int] = []
        server = await fake_enclave(socket_path, never_answer, connections)
        async with server:
            link = channel(socket_path, timeout=0.2)
            with pytest.raises(DependencyUnavailable, match="did not answer within"):
                await link.request(MessageType.HEALTH, {}, in_thread)
            assert not link.connected
            with pytest.raises(DependencyUnavailable):
                await link.request(MessageType.HEALTH, {}, in_thread)
        assert len(connections) == 2  # the second request connected again

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
