"""Copy bytes both ways between two stream pairs, with backpressure and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

CHUNK_SIZE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    """Seconds allowed for each stage of a proxied connection."""

    connect: float = 5.0
    handshake: float = 5.0
    idle: float = 300.0
    drain: float = 30.0


@dataclass(slots=True)
class Transfer:
    """Bytes moved by one spliced connection, and when anything last moved."""

    sent: int = 0
    received: int = 0
    last_activity: float = 0.0


async def splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    timeouts: ProxyTimeouts,
) -> Transfer:
    """Copy until both directions reach EOF; an error or idle timeout ends both.

    EOF in one direction is passed on as a half-close (``write_eof``), so request/response
    protocols that shut down their sending side keep working. Raises OSError or TimeoutError
    when the connection ends abnormally; the caller closes both writers.
    """
    transfer = Transfer(last_activity=asyncio.get_running_loop().time())
    tasks = [
        asyncio.create_task(_pump(client[0], upstream[1], transfer, True, timeouts)),
        asyncio.create_task(_pump(upstream[0], client[1], transfer, False, timeouts)),
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return transfer


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    transfer: Transfer,
    outbound: bool,
    timeouts: ProxyTimeouts,
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        remaining = transfer.last_activity + timeouts.idle - loop.time()
        if remaining <= 0:
            raise TimeoutError("connection idle")
        try:
            chunk = await asyncio.wait_for(reader.read(CHUNK_SIZE), remaining)
        except TimeoutError:
            continue
        if not chunk:
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
            return
        transfer.last_activity = loop.time()
        if outbound:
            transfer.sent += len(chunk)
        else:
            transfer.received += len(chunk)
        writer.write(chunk)
        await asyncio.wait_for(writer.drain(), timeouts.drain)


async def close_writers(*writers: asyncio.StreamWriter) -> None:
    """Close streams, then wait briefly for them, ignoring peers that already went away."""
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
