"""An audit log's lines, read from its file in bounded memory.

:class:`LogLines` splits the log as ``bytes.splitlines`` would (at ``\\n``, ``\\r\\n`` and
``\\r``) but reads it a block at a time, and never holds more of a line than one longer than
any record: a line over ``max_size`` bytes comes out cut to ``max_size + 1`` (still too
long, so still reported), however long it is in the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO, Final

_BLOCK: Final = 1 << 20


class LogLines:
    """The lines of an audit log open in ``file``, as many times as they are iterated: each
    time from the start up to the size the file had when this was made (so a log that is
    still being appended to is read as it was, and the same each time)."""

    def __init__(self, file: BinaryIO, *, max_size: int) -> None:
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        self.max_size = max_size

    def __iter__(self) -> Iterator[bytes]:
        limit = self.max_size + 1
        self._file.seek(0)
        left = self._size
        line = b""
        """The part of the current line read so far (at most ``limit`` bytes of it)."""
        in_line = False
        after_cr = False
        while left > 0:
            block = self._file.read(min(_BLOCK, left))
            if not block:
                break
            left -= len(block)
            if after_cr and block.startswith(b"\n"):  # a "\r\n" cut in two by the block
                block = block[1:]
            after_cr = block.endswith(b"\r")
            for piece in block.splitlines(keepends=True):
                if piece.endswith(b"\r\n"):
                    content, ends = piece[:-2], True
                elif piece.endswith((b"\n", b"\r")):
                    content, ends = piece[:-1], True
                else:
                    content, ends = piece, False
                if in_line:
                    content = line + content[: limit - len(line)]
                if not ends:
                    line, in_line = content[:limit], True
                    continue
                yield content[:limit]
                line, in_line = b"", False
        if in_line:
            yield line

    def last(self) -> bytes | None:
        """The last line; ``None`` if there is none or it is longer than ``max_size``."""
        span = min(self._size, self.max_size + 3)  # the line, its end, and the one before it
        if span == 0:
            return None
        self._file.seek(self._size - span)
        lines = self._file.read(span).splitlines()
        if not lines:  # the file shrank since
            return None
        last = lines[-1]
        if len(last) > self.max_size or (len(lines) == 1 and span < self._size):
            return None
        return last
