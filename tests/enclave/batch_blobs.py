"""What a hostile host can do to one sealed key inside a batch blob, on any blob store; and a
blob store that holds its first write in flight, for group commit tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from signd.enclave.references import BlobRange
from signd.enclave.signer import EnclaveSigner
from signd.errors import DependencyUnavailable
from signd.storage.base import BlobStore
from tests.enclave.fakes import MemoryBlobStore


def range_of(reference: str) -> BlobRange:
    """The batch-blob range a key's blob reference names (it must name one)."""
    where = BlobRange.parse(reference)
    assert where is not None, f"{reference!r} names no range of a batch blob"
    return where


def read_sealed(blobs: BlobStore, reference: str) -> bytes:
    """The sealed key a reference names: its range of the batch blob, or a whole legacy blob."""
    where = BlobRange.parse(reference)
    if where is None:
        return blobs.get(reference)
    return blobs.get_range(where.name, where.offset, where.length)


def replace_sealed(blobs: BlobStore, reference: str, data: bytes) -> str:
    """Rewrite the batch blob with ``data`` in place of the key's range; the range now holding it.

    With ``data`` of the range's length (a flipped bit, another key's sealed bytes) the other
    keys of the batch and the returned reference are unchanged; otherwise the bytes after the
    range move, so only the returned reference is still right.
    """
    where = range_of(reference)
    whole = blobs.get(where.name)
    end = where.offset + where.length
    blobs.delete(where.name)
    blobs.put(where.name, whole[: where.offset] + data + whole[end:])
    return f"{where.name}@{where.offset}+{len(data)}"


def swap_sealed(blobs: BlobStore, first: str, second: str) -> None:
    """Exchange the sealed bytes of two keys (same batch or not; equal lengths)."""
    a, b = read_sealed(blobs, first), read_sealed(blobs, second)
    assert len(a) == len(b)
    replace_sealed(blobs, first, b)
    replace_sealed(blobs, second, a)


class GatedBlobStore(MemoryBlobStore):
    """The first put blocks until ``gate`` is set: a durable write in flight, for as long as the
    test likes. With ``fail`` set, every later put fails."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.gate = threading.Event()
        self.fail = False
        self._first = True
        self._first_lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        with self._first_lock:
            first, self._first = self._first, False
        if first:
            self.writing.set()
            assert self.gate.wait(10), "the test never opened the gate"
        elif self.fail:
            raise DependencyUnavailable("memory blob store failed a write")
        super().put(name, data)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


def open_group_keys(signer: EnclaveSigner) -> int:
    group = signer._open_group
    return 0 if group is None else group.keys
