"""The enclave server sends the answers it makes at once for the frames of one read
together, in one write: one wake-up of the host instead of one per answer. A frame left to
the worker pool does not hold back the answers made before it."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.enclave import server as enclave_server
from signd.enclave.gate import EnclaveGate
from signd.enclave.protocol import (
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from signd.enclave.server import EnclaveApp, EnclaveServer
from signd.enclave.signer import EnclaveSigner
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore

TOKEN = "server-writes-token"
CLIENTS = f"""
version = 1

[[clients]]
id = "reader"
scopes = ["keys:read"]
key_labels = ["*"]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
""".encode()
POLICY = b"version = 1\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EnclaveServer]:
    kms = LocalKms(tmp_path)
    signer = EnclaveSigner(kms, FilesystemBlobStore(tmp_path / "blobs"))
    gate = EnclaveGate(signer, kms)
    gate.configure({"clients": CLIENTS, "policy": POLICY})
    running = EnclaveServer(EnclaveApp(signer, gate=gate, gate_only=True))
    yield running
    running.close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the server's writers send, one item per write."""
    sent: list[bytes] = []
    send = enclave_server._Writer.send

    def recorded(writer: enclave_server._Writer, data: bytes) -> None:
        sent.append(data)
        send(writer, data)

    monkeypatch.setattr(enclave_server._Writer, "send", recorded)
    return sent


def authenticate(request_id: int) -> bytes:
    """A GATE that only authenticates: the enclave answers it at once, from memory."""
    request = {
        "method": "POST",
        "target": "/v1/sign/hash",
        "body": b'{"key": "k", "hash": "0x' + b"00" * 32 + b'"}',
        "headers": {"Authorization": f"Bearer {TOKEN}"},
    }
    return encode_frame(MessageType.GATE, request_id, {"request": request, "keys": []})


def health(request_id: int) -> bytes:
    """A HEALTH request: it asks KMS and the blob store, so it goes to the worker pool."""
    return encode_frame(MessageType.HEALTH, request_id, {})


def exchange(server: EnclaveServer, data: bytes, answers: int) -> list[Frame]:
    """Send ``data`` in one write and read ``answers`` frames back."""
    ours, theirs = socket.socketpair()
    server.serve_connection(theirs)
    decoder = FrameDecoder(max_frame_size=1 << 24)
    frames: list[Frame] = []
    with ours:
        ours.settimeout(10)
        ours.sendall(data)
        while len(frames) < answers:
            for event in decoder.feed(ours.recv(1 << 16)):
                assert isinstance(event, Frame), event
                frames.append(event)
    return frames


def frames_in(data: bytes) -> list[int]:
    """The request ids of the frames in one write."""
    return [event.request_id for event in FrameDecoder(max_frame_size=1 << 24).feed(data)]


def test_answers_made_at_once_go_out_in_one_write(
    server: EnclaveServer, writes: list[bytes]
) -> None:
    frames = exchange(server, authenticate(1) + authenticate(2) + authenticate(3), 3)
    assert [frame.request_id for frame in frames] == [1, 2, 3]
    assert all("principal" in frame.body for frame in frames)
    assert [frames_in(data) for data in writes] == [[1, 2, 3]]


def test_a_frame_for_the_pool_does_not_hold_back_the_answers_before_it(
    server: EnclaveServer, writes: list[bytes]
) -> None:
    frames = exchange(server, authenticate(1) + health(2) + authenticate(3), 3)
    assert sorted(frame.request_id for frame in frames) == [1, 2, 3]
    assert frames_in(writes[0]) == [1]  # sent before HEALTH went to the pool
    assert sorted(frames_in(data)[0] for data in writes[1:]) == [2, 3]


def test_at_most_answers_held_wait_for_one_write(
    server: EnclaveServer, writes: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enclave_server, "ANSWERS_HELD", 2)
    exchange(server, b"".join(authenticate(n) for n in range(1, 6)), 5)
    assert [frames_in(data) for data in writes] == [[1, 2], [3, 4], [5]]


def test_a_garbled_stream_gets_the_answers_before_it_and_its_error(
    server: EnclaveServer, writes: list[bytes]
) -> None:
    frames = exchange(server, authenticate(1) + b"garbage!" * 4, 2)
    assert frames[0].request_id == 1 and "principal" in frames[0].body
    assert frames[1].message_type is MessageType.ERROR
    assert len(writes) == 1


def test_many_connections_are_answered_independently(server: EnclaveServer) -> None:
    results: list[list[int]] = []

    def one(base: int) -> None:
        frames = exchange(server, b"".join(authenticate(base + n) for n in range(4)), 4)
        results.append([frame.request_id for frame in frames])

    threads = [threading.Thread(target=one, args=(base,)) for base in (100, 200, 300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(results) == [[b + n for n in range(4)] for b in (100, 200, 300)]
