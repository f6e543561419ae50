"""Blob names shared by every blob store, and the filesystem blob store.

:class:`FilesystemBlobStore` lays blobs out as ``root/ab/cd/<name>``, where ``abcd`` starts
the SHA-256 of the name, so a million blobs spread over 65,536 folders of a few each. A blob
appears under its name only once its bytes are on disk: it is written to a temporary file in
the same folder, fsynced, hard-linked to its final name (which, unlike ``rename``, refuses to
replace an existing blob) and the folder fsynced. A crash before the link leaves only a
hidden ``.*.tmp`` file, which is never read as a blob.

The root holds a marker file, :data:`MARKER`, written when the store is made. A root without
it is not this store: most likely the mount point of a volume that is not mounted, an empty
folder where the blobs should be. Reading it would answer "no such key" for every key, and
writing to it would put new keys on the wrong disk, to vanish when the volume comes back; so
every operation that would do either refuses with :class:`DependencyUnavailable` instead.

:meth:`FilesystemBlobStore.list_blobs` walks the shard folders a folder at a time and yields
each blob's size and mtime from one ``stat``; it skips hidden files (temporary files, the
marker) and any file that is not where its name would put it (no ``get`` would find it).

:meth:`FilesystemBlobStore.quarantine` moves a blob to ``root/quarantine/<name>``, a folder
the listing never walks (it walks two-character shard folders only) and where no ``get``
looks. The move is a hard link to the new name (which never replaces a file there), a sync
of the quarantine folder, then the unlink of the old name and a sync of its folder: a crash
leaves the blob under one name or both, never none, and a second call finishes the move once
it finds both names on the same file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from signd import files
from signd.errors import DependencyUnavailable, InvalidField, KeyExists, KeyNotFound
from signd.storage.base import BlobStat, BlobStore, check_range

MAX_NAME_BYTES = 200
"""Longest blob name in UTF-8 bytes (a file name is at most 255, with room for a temp suffix)."""

_FORBIDDEN_CHARS = frozenset("/\\")

QUARANTINE_FOLDER = "quarantine"
"""The folder under the root that holds quarantined blobs, flat, under their names."""

MARKER = ".signd-blob-store"
"""The file that says a folder is a blob store's root (no blob name starts with ``.``)."""
_MARKER_TEXT = b"signd filesystem blob store: blobs are under the two-level shard folders\n"


def check_blob_name(name: str) -> str:
    """Return ``name`` if it is a safe blob name, else raise InvalidField.

    A name is 1-200 UTF-8 bytes of printable characters without ``/``, ``\\`` or ``..`` and
    does not start with ``.`` (that prefix is kept for temporary files).
    """
    if not isinstance(name, str) or not name:
        raise InvalidField("blob name must be a non-empty string", field="name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidField(f"blob name longer than {MAX_NAME_BYTES} bytes", field="name")
    if (
        not name.isprintable()
        or name.startswith(".")
        or ".." in name
        or _FORBIDDEN_CHARS.intersection(name)
    ):
        raise InvalidField(
            "blob name must be printable, without '/', '\\' or '..', not starting with '.'",
            field="name",
        )
    return name


def _blob_stat(name: str, info: os.stat_result) -> BlobStat:
    return BlobStat(name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))


def _subfolders(folder: Path) -> list[Path]:
    """The shard folders (two-character names, not hidden) directly in ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(
            Path(entry.path)
            for entry in entries
            if len(entry.name) == 2
            and not entry.name.startswith(".")
            and entry.is_dir(follow_symlinks=False)
        )


def _unavailable(root: Path, action: str, exc: OSError) -> DependencyUnavailable:
    reason = os.strerror(exc.errno) if exc.errno is not None else type(exc).__name__
    return DependencyUnavailable(f"blob store at {root}: cannot {action}: {reason}")


class FilesystemBlobStore(BlobStore):
    """Blobs as files under ``root``, written atomically and durably."""

    def __init__(self, root: Path) -> None:
        """Open the store at ``root``, making it (folder and marker) if the folder does not
        exist. A folder that holds shard folders but no marker is a store from before the
        marker, and gets one. An existing empty folder gets none: it may be a mount point
        whose volume is missing (see :data:`MARKER`), so operations refuse until the
        marker is there."""
        self.root = Path(root)
        self.marker = self.root / MARKER
        try:
            made = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.marker.exists() and (made or self._holds_shards()):
                self._write_marker()
        except OSError as exc:
            raise _unavailable(self.root, "create the root folder", exc) from exc

    def _holds_shards(self) -> bool:
        return any(
            entry.is_dir() and len(entry.name) == 2 and not entry.name.startswith(".")
            for entry in self.root.iterdir()
        )

    def _write_marker(self) -> None:
        temp = self.root / f"{MARKER}.{secrets.token_hex(8)}.tmp"
        temp.write_bytes(_MARKER_TEXT)
        os.replace(temp, self.marker)
        files.sync_folder(self.root)

    def _check_marker(self) -> None:
        """Refuse (503) unless the root is this store's, see :data:`MARKER`."""
        if not self.root.is_dir():
            raise DependencyUnavailable(f"blob store at {self.root}: the folder is gone")
        if not self.marker.is_file():
            raise DependencyUnavailable(
                f"blob store at {self.root}: the folder has no {MARKER} marker, so it is not"
                " the blob store (a volume not mounted?). If it is a new, empty store, create"
                f" the marker: touch {self.marker}"
            )

    def path_of(self, name: str) -> Path:
        """Where the blob ``name`` lives (whether or not it exists)."""
        digest = hashlib.sha256(check_blob_name(name).encode("utf-8", "surrogatepass"))
        shard = digest.hexdigest()
        return self.root / shard[:2] / shard[2:4] / name

    def put(self, name: str, data: bytes) -> None:
        path = self.path_of(name)
        self._check_marker()
        try:
            self._make_folders(path.parent.parent, path.parent)
            self._write_new(path, bytes(data))
        except FileExistsError as exc:
            raise KeyExists(f"blob {name!r} already exists") from exc
        except OSError as exc:
            raise _unavailable(self.root, f"write blob {name!r}", exc) from exc

    def get(self, name: str) -> bytes:
        path = self.path_of(name)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise self._missing(name) from exc
        except OSError as exc:
            raise _unavailable(self.root, f"read blob {name!r}", exc) from exc

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        path = self.path_of(name)
        try:
            with path.open("rb") as file:
                file.seek(offset)
                data = file.read(length)
        except FileNotFoundError as exc:
            raise self._missing(name) from exc
        except OSError as exc:
            raise _unavailable(self.root, f"read blob {name!r}", exc) from exc
        if len(data) != length:
            raise KeyNotFound(f"blob {name!r} has no bytes {offset}..{offset + length}")
        return data

    def delete(self, name: str) -> None:
        path = self.path_of(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unavailable(self.root, f"delete blob {name!r}", exc) from exc
        try:
            files.sync_folder(path.parent)
        except OSError as exc:
            raise _unavailable(self.root, f"delete blob {name!r}", exc) from exc

    def stat(self, name: str) -> BlobStat | None:
        path = self.path_of(name)
        try:
            return _blob_stat(name, path.stat())
        except FileNotFoundError:
            missing = self._missing(name)
            if isinstance(missing, DependencyUnavailable):
                raise missing from None
            return None
        except OSError as exc:
            raise _unavailable(self.root, f"stat blob {name!r}", exc) from exc

    def list_blobs(self, prefix: str = "") -> Iterator[BlobStat]:
        self._check_marker()
        try:
            for outer in _subfolders(self.root):
                for shard in _subfolders(outer):
                    yield from self._blobs_in(shard, prefix)
        except OSError as exc:
            raise _unavailable(self.root, "list the blobs", exc) from exc

    def _blobs_in(self, shard: Path, prefix: str) -> Iterator[BlobStat]:
        """The blobs in one shard folder whose names start with ``prefix``."""
        with os.scandir(shard) as entries:
            found = [
                entry
                for entry in entries
                if entry.name.startswith(prefix) and not entry.name.startswith(".")
            ]
        for entry in found:
            try:
                if self.path_of(entry.name) != Path(entry.path) or not entry.is_file(
                    follow_symlinks=False
                ):
                    continue
                info = entry.stat(follow_symlinks=False)
            except (InvalidField, FileNotFoundError):  # not a blob name; deleted meanwhile
                continue
            yield _blob_stat(entry.name, info)

    def quarantine(self, name: str) -> str:
        source = self.path_of(name)
        target = self.root / QUARANTINE_FOLDER / name
        self._check_marker()
        try:
            self._make_folders(target.parent)
            try:
                os.link(source, target)
            except FileExistsError:
                if not os.path.samefile(source, target):  # else: a crash stopped a move
                    raise KeyExists(
                        f"the quarantine already holds another blob named {name!r}"
                    ) from None
            files.sync_folder(target.parent)
            source.unlink(missing_ok=True)
            files.sync_folder(source.parent)
        except FileNotFoundError as exc:
            raise self._missing(name) from exc
        except OSError as exc:
            raise _unavailable(self.root, f"quarantine blob {name!r}", exc) from exc
        return str(target)

    def list_quarantined(self) -> Iterator[BlobStat]:
        self._check_marker()
        try:
            with os.scandir(self.root / QUARANTINE_FOLDER) as entries:
                found = [entry for entry in entries if not entry.name.startswith(".")]
        except FileNotFoundError:  # nothing was ever quarantined
            return
        except OSError as exc:
            raise _unavailable(self.root, "list the quarantine", exc) from exc
        for entry in found:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # purged meanwhile
                continue
            except OSError as exc:
                raise _unavailable(self.root, "list the quarantine", exc) from exc
            yield _blob_stat(entry.name, info)

    def check_health(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise DependencyUnavailable(f"blob store at {self.root}: not a writable folder")
        self._check_marker()

    def _missing(self, name: str) -> KeyNotFound | DependencyUnavailable:
        """No file for ``name``: the blob is missing, or the whole store is (an unmounted
        volume), which must not read as a key that does not exist."""
        try:
            self._check_marker()
        except DependencyUnavailable as exc:
            return exc
        return KeyNotFound(f"no blob {name!r}")

    def _make_folders(self, *folders: Path) -> None:
        """Create each folder in turn if needed, durably (its parent is fsynced)."""
        for folder in folders:
            if not folder.is_dir():
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                files.sync_folder(folder.parent)

    def _write_new(self, path: Path, data: bytes) -> None:
        """Write ``data`` to a temp file, fsync it, link it to ``path`` and fsync the folder."""
        if path.exists() or not files.write_new(path, data):
            raise FileExistsError(errno.EEXIST, "blob exists", str(path))
