"""The downstream node client against a real socket: its timeout bounds each whole call."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from signd.api.downstream import Downstream
from signd.errors import DependencyUnavailable

TIMEOUT = 0.5
TRICKLE_BYTES = 60
TRICKLE_PAUSE = 0.1
"""A byte every 0.1 s: each read is well within the timeout, the answer takes 6 s."""


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read a request, then send an answer one byte at a time."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % TRICKLE_BYTES
        )
        for _ in range(TRICKLE_BYTES):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(TRICKLE_PAUSE)
    writer.close()


def test_a_node_that_sends_its_answer_slowly_is_cut_at_the_timeout() -> None:
    """httpx's timeouts bound each read; a node that keeps sending a byte now and then must
    still be given up on once the whole call has taken the timeout."""

    async def scenario() -> float:
        server = await asyncio.start_server(_trickle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        downstream = Downstream(f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        started = time.monotonic()
        try:
            with pytest.raises(DependencyUnavailable, match="did not answer in time"):
                await downstream.call("eth_blockNumber", [])
            return time.monotonic() - started
        finally:
            await downstream.aclose()
            server.close()

    assert asyncio.run(scenario()) < TIMEOUT + 1.0
