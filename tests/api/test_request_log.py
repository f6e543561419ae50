"""The per-request bookkeeping's cheap parts: request ids, the access line's text, the
histogram's buckets, and the log handler that batches access lines (bounded in time, all
written at exit)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from signd.api.metrics import ApiMetrics, Histogram
from signd.api.middleware import (
    ACCESS_LOGGER,
    BatchingLogHandler,
    RequestLog,
    access_line,
    new_request_id,
    request_id_from,
    utc_timestamp,
)
from signd.cli.serve import JsonLogFormatter, configure_logging

PLAIN_TOKEN = r"^[A-Za-z0-9._-]{1,64}$"
ACCESS = logging.getLogger(ACCESS_LOGGER)

# --------------------------------------------------------------------------- request ids


def test_fresh_request_ids_are_unique_32_hex_digits() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for request_id in ids[:100]:
        assert len(request_id) == 32
        int(request_id, 16)


def test_the_callers_request_id_is_kept_when_it_is_a_plain_token() -> None:
    def scope(value: bytes) -> dict[str, Any]:
        return {"headers": [(b"authorization", b"Bearer t"), (b"x-request-id", value)]}

    assert request_id_from(scope(b"req-42.a_b")) == "req-42.a_b"
    for unfit in (b"bad id", b"x" * 65, b"", b'quote"', b"line\n"):
        fresh = request_id_from(scope(unfit))
        assert fresh != unfit.decode() and len(fresh) == 32


def test_a_forked_child_draws_request_ids_of_its_own() -> None:
    script = """
import os
from signd.api.middleware import new_request_id
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, new_request_id().encode())
    os._exit(0)
os.wait()
print(new_request_id(), os.read(read, 64).decode())
"""
    parent, child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert parent[:16] != child[:16]


# --------------------------------------------------------------------------- access line


@pytest.mark.parametrize(
    "nanoseconds",
    [
        0,
        999_999_999,
        1_700_000_000_000_000_000,
        1_700_000_000_999_999_999,
        1_709_251_199_123_456_789,  # 2024-02-29T23:59:59
        1_709_251_200_000_999_999,
    ],
)
def test_the_timestamp_is_what_datetime_isoformat_gives(nanoseconds: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=nanoseconds // 1000)
    assert utc_timestamp(nanoseconds) == moment.isoformat(timespec="milliseconds")
    assert utc_timestamp(nanoseconds) == utc_timestamp(nanoseconds)  # cached second, same text


def test_the_live_timestamp_is_now() -> None:
    before = datetime.now(UTC).isoformat(timespec="milliseconds")
    stamp = utc_timestamp()
    after = datetime.now(UTC).isoformat(timespec="milliseconds")
    assert before <= stamp <= after


@pytest.mark.parametrize(
    "path", ["/v1/sign/hash", '/a"b\\c', "/caf\u00e9/\u2603/\U0001f600", "/tab\tnl\n\x00"]
)
@pytest.mark.parametrize("rpc_methods", [None, [], ["eth_chainId", "other"]])
def test_the_access_line_is_what_json_dumps_gives(path: str, rpc_methods: list[str] | None) -> None:
    line = access_line("req-1", "POST", path, "/v1/keys/{ref}", 200, 0.123, rpc_methods)
    fields = json.loads(line)
    expected: dict[str, Any] = {
        "ts": fields["ts"],
        "event": "request",
        "request_id": "req-1",
        "method": "POST",
        "path": path,
        "route": "/v1/keys/{ref}",
        "status": 200,
        "duration_ms": 0.123,
    }
    if rpc_methods is not None:
        expected["rpc_methods"] = rpc_methods
    assert line == json.dumps(expected)


# --------------------------------------------------------------------------- the middleware


async def endpoint() -> None:
    """Stands for a route's endpoint."""


def run_request_log(
    response_headers: list[tuple[bytes, bytes]], request_headers: list[tuple[bytes, bytes]]
) -> tuple[list[dict[str, Any]], ApiMetrics]:
    metrics = ApiMetrics()
    sent: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["endpoint"] = endpoint
        await send({"type": "http.response.start", "status": 201, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": request_headers}
    asyncio.run(RequestLog(app, metrics=metrics, routes={endpoint: "/v1/x"})(scope, receive, send))
    return sent, metrics


def test_the_request_id_header_is_added_to_a_copy_of_the_response_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    shared = [(b"content-type", b"application/json")]  # a response object's own list
    sent, metrics = run_request_log(shared, [(b"x-request-id", b"abc")])
    assert sent[0]["headers"] == [(b"content-type", b"application/json"), (b"x-request-id", b"abc")]
    assert shared == [(b"content-type", b"application/json")]
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    line = json.loads(record.getMessage())
    assert (line["request_id"], line["route"], line["status"]) == ("abc", "/v1/x", 201)
    assert metrics.requests.value("/v1/x", "POST", "201") == 1


def test_no_access_line_is_made_when_the_access_logger_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)
    sent, metrics = run_request_log([], [])
    assert [r for r in caplog.records if r.name == ACCESS_LOGGER] == []
    assert dict(sent[0]["headers"])[b"x-request-id"]
    assert metrics.requests.value("/v1/x", "POST", "201") == 1
    assert metrics.latency.count("/v1/x") == 1


# --------------------------------------------------------------------------- histogram


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    histogram = Histogram("h", "help", ("route",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(value, "/r")
    assert histogram.count("/r") == 5
    assert histogram.count("/other") == 0
    assert histogram.expose() == [
        "# HELP h help",
        "# TYPE h histogram",
        'h_bucket{route="/r",le="0.1"} 2',
        'h_bucket{route="/r",le="1"} 4',
        'h_bucket{route="/r",le="+Inf"} 5',
        'h_sum{route="/r"} 4.65',
        'h_count{route="/r"} 5',
    ]


# --------------------------------------------------------------------------- log handler


class Recording(io.StringIO):
    """A stream that remembers when it was flushed with something new in it."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[tuple[float, str]] = []

    def flush(self) -> None:
        text = self.getvalue()
        if not self.flushed or self.flushed[-1][1] != text:
            self.flushed.append((time.monotonic(), text))


@pytest.fixture
def batching() -> Iterator[tuple[BatchingLogHandler, Recording, logging.Logger]]:
    """A handler (delay 0.2 s) on a logger of its own and, for the access lines, the access
    logger (its records reach no other handler meanwhile)."""
    stream = Recording()
    handler = BatchingLogHandler(stream, delay=0.2, max_lines=5)
    handler.setFormatter(JsonLogFormatter())
    other = logging.getLogger("signd.tests.batching")
    saved = (ACCESS.level, ACCESS.propagate)
    for logger in (ACCESS, other):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield handler, stream, other
    finally:
        for logger in (ACCESS, other):
            logger.removeHandler(handler)
        ACCESS.setLevel(saved[0])
        ACCESS.propagate = saved[1]
        handler.close()


def wait_until_written(stream: Recording, text: str, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for when, written in stream.flushed:
            if text in written:
                return when
        time.sleep(0.01)
    raise AssertionError(f"{text!r} was not written in {timeout}s")


def test_an_access_line_is_written_within_the_delay(
    batching: tuple[BatchingLogHandler, Recording, logging.Logger],
) -> None:
    _, stream, _ = batching
    logged = time.monotonic()
    ACCESS.info('{"line": 1}')
    ACCESS.info('{"line": 2}')
    assert stream.getvalue() == ""  # waiting for the flushing thread
    written = wait_until_written(stream, '{"line": 2}')
    assert stream.getvalue() == '{"line": 1}\n{"line": 2}\n'
    assert 0.15 <= written - logged < 2.0
    ACCESS.info('{"line": 3}')  # the thread serves the next batch too
    wait_until_written(stream, '{"line": 3}')


def test_any_other_record_is_written_at_once_after_the_waiting_lines(
    batching: tuple[BatchingLogHandler, Recording, logging.Logger],
) -> None:
    _, stream, other = batching
    ACCESS.info('{"line": 1}')
    other.info("started")
    lines = stream.getvalue().splitlines()
    assert lines[0] == '{"line": 1}'
    assert json.loads(lines[1])["message"] == "started"
    ACCESS.warning('{"line": 2}')  # an access record above INFO is not batched either
    assert stream.getvalue().endswith('{"line": 2}\n')
    assert stream.flushed[-1][1] == stream.getvalue()


def test_a_full_batch_is_written_at_once(
    batching: tuple[BatchingLogHandler, Recording, logging.Logger],
) -> None:
    _, stream, _ = batching
    for number in range(5):
        ACCESS.info(f'{{"line": {number}}}')
    assert stream.getvalue().count("\n") == 5
    assert stream.flushed[-1][1] == stream.getvalue()


def test_flush_and_close_write_the_waiting_lines(
    batching: tuple[BatchingLogHandler, Recording, logging.Logger],
) -> None:
    handler, stream, _ = batching
    ACCESS.info('{"line": 1}')
    handler.flush()
    assert stream.flushed[-1][1] == '{"line": 1}\n'
    ACCESS.info('{"line": 2}')
    flusher = handler._flusher
    handler.close()
    assert stream.flushed[-1][1].endswith('{"line": 2}\n')
    ACCESS.info('{"line": 3}')  # a closed handler writes at once
    assert stream.getvalue().endswith('{"line": 3}\n')
    assert flusher is not None
    flusher.join(timeout=5)
    assert not flusher.is_alive()


@pytest.mark.parametrize("ending", ["", "raise SystemExit(3)"])
def test_every_line_is_written_when_the_process_exits(ending: str) -> None:
    script = f"""
import logging
from signd.cli.serve import configure_logging
configure_logging("info")
for number in range(1000):
    logging.getLogger("signd.api.access").info('{{"line": %d}}' % number)
{ending}
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stderr.splitlines() == [f'{{"line": {n}}}' for n in range(1000)]


def test_a_forked_child_does_not_write_its_parents_waiting_lines() -> None:
    script = """
import logging, os
from signd.cli.serve import configure_logging
configure_logging("info")
access = logging.getLogger("signd.api.access")
access.info('{"from": "parent"}')
if os.fork() == 0:
    access.info('{"from": "child"}')
    logging.shutdown()
    os._exit(0)
os.wait()
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert sorted(result.stderr.splitlines()) == ['{"from": "child"}', '{"from": "parent"}']


@pytest.fixture
def restores_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        logging._srcfile,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
    )
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging._srcfile = saved[2]
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved[3:]


@pytest.mark.usefixtures("restores_logging")
def test_configure_logging_replaces_its_previous_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info")
    [first] = logging.getLogger().handlers
    ACCESS.info('{"line": 1}')
    configure_logging("warning")
    [second] = logging.getLogger().handlers
    assert isinstance(second, BatchingLogHandler) and second is not first
    assert stream.getvalue() == '{"line": 1}\n'  # the first one was closed, its line written
    logging.getLogger("signd.tests").warning("careful")
    assert json.loads(stream.getvalue().splitlines()[1])["level"] == "warning"
