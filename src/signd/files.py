"""Files written whole or not at all, and durably: what the key stores, the kms-server's state
and the gate's key files share.

A file is written to a temporary name in its own folder (``.<name>.<random>.tmp``, which no
reader takes for the file), synced, then linked or renamed to its name, and the folder synced:
a crash leaves no file or the whole one, never a part of it. Standard library only: the
enclave and the kms-server import it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600
"""The mode of a file only its owner may read."""


def sync_folder(folder: Path) -> None:
    """Make the names created in or removed from ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_new(path: Path, data: bytes, mode: int = PRIVATE) -> bool:
    """Create ``path`` holding ``data`` unless a file of that name exists (``False``, and it
    is left as it is: a hard link, unlike a rename, never replaces one)."""
    staged = _staged(path, data, mode)
    try:
        try:
            os.link(staged, path)
        except FileExistsError:
            return False
    finally:
        staged.unlink(missing_ok=True)
    sync_folder(path.parent)
    return True


def replace(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    """Write ``path`` holding ``data``, replacing any file of that name in one step."""
    staged = _staged(path, data, mode)
    try:
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    sync_folder(path.parent)


def _staged(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new temporary file beside ``path``, synced to disk."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(staged, flags, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged
