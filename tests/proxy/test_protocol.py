from __future__ import annotations

import pytest

from signd.errors import InvalidRequest
from signd.proxy import Endpoint
from signd.proxy.protocol import Reply, encode_connect, parse_connect, parse_reply


@pytest.mark.parametrize("text", ["kms.us-east-1.amazonaws.com:443", "[::1]:80", "10.1.2.3:1"])
def test_connect_round_trip(text: str) -> None:
    endpoint = Endpoint.parse(text)
    line = encode_connect(endpoint)
    assert line == f"CONNECT {text}\n".encode()
    assert parse_connect(line) == endpoint


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT example.com:443",
        b"CONNECT example.com:443\r\n",
        b"CONNECT  example.com:443\n",
        b"CONNECT example.com:443 extra\n",
        b"connect example.com:443\n",
        b"CONNECT " + b"a." * 300 + b"com:443\n",
        b"\n",
    ],
)
def test_malformed_connect(line: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_connect(line)


@pytest.mark.parametrize("reply", list(Reply))
def test_reply_round_trip(reply: Reply) -> None:
    assert parse_reply(reply.encode()) is reply


@pytest.mark.parametrize("line", [b"", b"ok\n", b"OK \n", b"\xff\n", b"MAYBE\n"])
def test_malformed_reply(line: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_reply(line)
