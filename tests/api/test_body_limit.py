"""The request-body limit: it fits the one enclave frame that carries a request to the gate,
and bodies are read off the ASGI messages within it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive

from signd.api.errors import ClientDisconnected, PayloadTooLarge, wire_error
from signd.api.inputs import BODY_STATE, receive_body
from signd.api.settings import MAX_BODY_BYTES, ApiSettings
from signd.enclave.protocol import DEFAULT_MAX_FRAME_SIZE
from signd.errors import ConfigurationError


def test_the_default_body_limit_leaves_room_in_an_enclave_frame() -> None:
    assert ApiSettings().max_body_bytes == MAX_BODY_BYTES
    assert MAX_BODY_BYTES * 2 <= DEFAULT_MAX_FRAME_SIZE


def test_a_body_limit_over_half_a_frame_is_refused() -> None:
    ApiSettings(max_body_bytes=MAX_BODY_BYTES)
    with pytest.raises(ConfigurationError, match="max_body_bytes must be at most"):
        ApiSettings(max_body_bytes=MAX_BODY_BYTES + 1)


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/sign/hash", "headers": headers}


def _receiving(*messages: Message) -> tuple[Receive, list[Message]]:
    """A receive callable giving ``messages`` in order, and the list of those taken."""
    taken: list[Message] = []
    waiting = list(messages)

    async def receive() -> Message:
        message = waiting.pop(0)
        taken.append(message)
        return message

    return receive, taken


def test_a_body_in_chunks_is_read_whole_once_and_kept_for_the_next_reader() -> None:
    receive, taken = _receiving(
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
    )
    scope = _scope([])
    assert asyncio.run(receive_body(scope, receive, 64)) == b'{"a":1}'
    assert asyncio.run(receive_body(scope, receive, 64)) == b'{"a":1}'  # kept: not read again
    assert len(taken) == 3
    assert scope["state"][BODY_STATE] == b'{"a":1}'


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    receive, taken = _receiving({"type": "http.request", "body": b"x" * 65})
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_body(_scope([(b"content-length", b"65")]), receive, 64))
    assert taken == []


def test_a_body_growing_over_the_limit_is_refused_at_the_chunk_that_crosses_it() -> None:
    receive, taken = _receiving(
        {"type": "http.request", "body": b"x" * 40, "more_body": True},
        {"type": "http.request", "body": b"y" * 40, "more_body": True},
        {"type": "http.request", "body": b"z", "more_body": False},
    )
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_body(_scope([(b"content-length", b"10")]), receive, 64))
    assert len(taken) == 2  # a lying content-length does not lift the limit


def test_a_client_gone_before_its_body_arrived_is_a_disconnect() -> None:
    receive, _ = _receiving(
        {"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}
    )
    scope = _scope([])
    with pytest.raises(ClientDisconnected) as gone:
        asyncio.run(receive_body(scope, receive, 64))
    assert BODY_STATE not in scope["state"]  # no half body kept for the next reader
    wire = wire_error(gone.value)  # an answer of its own, not the 500 of an unhandled error
    assert (wire.http_status, wire.body["code"]) == (499, "client_disconnected")
