"""The one-line handshake between the enclave forwarder and the host proxy (sans-I/O).

The forwarder opens a connection and sends ``CONNECT host:port\\n`` (ASCII). The proxy
answers one line and, only after ``OK``, both sides carry raw bytes::

    OK           connected to the destination; bytes flow from here on
    DENIED       the header was malformed or the destination is not on the allowlist
    UNREACHABLE  the destination is allowlisted but could not be connected to
    BUSY         the proxy is at its connection limit
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from signd.errors import InvalidField, InvalidRequest
from signd.proxy.allowlist import Endpoint

MAX_LINE: Final = 512
_CONNECT: Final = b"CONNECT "


class Reply(Enum):
    OK = "OK"
    DENIED = "DENIED"
    UNREACHABLE = "UNREACHABLE"
    BUSY = "BUSY"

    def encode(self) -> bytes:
        return self.value.encode() + b"\n"


def encode_connect(destination: Endpoint) -> bytes:
    return _CONNECT + str(destination).encode() + b"\n"


def parse_connect(line: bytes) -> Endpoint:
    """The destination named by one header line (with its ``\\n``); InvalidRequest if malformed."""
    if len(line) > MAX_LINE or not line.startswith(_CONNECT) or not line.endswith(b"\n"):
        raise InvalidRequest("malformed proxy header")
    try:
        text = line[len(_CONNECT) : -1].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRequest("malformed proxy header") from None
    try:
        return Endpoint.parse(text)
    except InvalidField:
        raise InvalidRequest("malformed proxy header") from None


def parse_reply(line: bytes) -> Reply:
    try:
        return Reply(line.removesuffix(b"\n").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("malformed proxy reply") from None
