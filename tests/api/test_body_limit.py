"""The request-body limits: the size fits the one enclave frame that carries a request to the
gate, and bodies are read off the ASGI messages within it and within ``body_timeout``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.types import Message, Receive

from signd.api.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout, wire_error
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


TIMEOUT = 30.0
"""Longer than any test here takes: only the timeout test waits for it."""


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
    assert asyncio.run(receive_body(scope, receive, 64, TIMEOUT)) == b'{"a":1}'
    assert (
        asyncio.run(receive_body(scope, receive, 64, TIMEOUT)) == b'{"a":1}'
    )  # kept: not read again
    assert len(taken) == 3
    assert scope["state"][BODY_STATE] == b'{"a":1}'


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    receive, taken = _receiving({"type": "http.request", "body": b"x" * 65})
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_body(_scope([(b"content-length", b"65")]), receive, 64, TIMEOUT))
    assert taken == []


def test_a_body_growing_over_the_limit_is_refused_at_the_chunk_that_crosses_it() -> None:
    receive, taken = _receiving(
        {"type": "http.request", "body": b"x" * 40, "more_body": True},
        {"type": "http.request", "body": b"y" * 40, "more_body": True},
        {"type": "http.request", "body": b"z", "more_body": False},
    )
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_body(_scope([(b"content-length", b"10")]), receive, 64, TIMEOUT))
    assert len(taken) == 2  # a lying content-length does not lift the limit


def test_a_client_gone_before_its_body_arrived_is_a_disconnect() -> None:
    receive, _ = _receiving(
        {"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}
    )
    scope = _scope([])
    with pytest.raises(ClientDisconnected) as gone:
        asyncio.run(receive_body(scope, receive, 64, TIMEOUT))
    assert BODY_STATE not in scope["state"]  # no half body kept for the next reader
    wire = wire_error(gone.value)  # an answer of its own, not the 500 of an unhandled error
    assert (wire.http_status, wire.body["code"]) == (499, "client_disconnected")


def test_a_body_not_all_in_within_the_timeout_gets_408_and_nothing_is_kept() -> None:
    taken: list[Message] = []

    async def receive_then_stall() -> Message:
        if not taken:
            taken.append({"type": "http.request", "body": b"{", "more_body": True})
            return taken[0]
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    scope = _scope([(b"content-length", b"1000")])
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as late:
        asyncio.run(receive_body(scope, receive_then_stall, 64 * 1024, 0.2))
    assert 0.2 <= time.monotonic() - started < 5
    assert BODY_STATE not in scope["state"]
    wire = wire_error(late.value)
    assert (wire.http_status, wire.body["code"]) == (408, "request_timeout")
    assert wire.body["message"] == "the request body did not arrive within 0.2 s"


@pytest.mark.parametrize("name", ["body_timeout", "health_timeout", "downstream_timeout"])
@pytest.mark.parametrize("value", [0, -1, 0.0, "30", True, float("nan"), float("inf")])
def test_timeouts_must_be_a_positive_number_of_seconds(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as refused:
        ApiSettings.from_mapping({name: value})
    assert refused.value.message == f"api.{name} must be a positive number of seconds"


def test_body_timeout_takes_seconds_as_an_integer_or_a_fraction() -> None:
    assert ApiSettings().body_timeout == 30
    assert ApiSettings.from_mapping({"body_timeout": 2}).body_timeout == 2
    assert ApiSettings.from_mapping({"body_timeout": 0.5}).body_timeout == 0.5


@pytest.mark.parametrize("value", [0, -1, 1.5, "1000", True])
def test_max_connections_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ConfigurationError) as refused:
        ApiSettings.from_mapping({"max_connections": value})
    assert refused.value.message == "api.max_connections must be a positive integer"
