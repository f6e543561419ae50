"""What only the filesystem blob store promises: layout, crash safety, OS errors."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from signd.errors import DependencyUnavailable, KeyExists, KeyNotFound
from signd.storage.blobs import MARKER, FilesystemBlobStore


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def test_blobs_are_sharded_two_levels_deep(store: FilesystemBlobStore) -> None:
    for i in range(300):
        store.put(f"key-{i}", b"x")
    top = [p for p in store.root.iterdir() if p.name != MARKER]
    assert all(p.is_dir() and len(p.name) == 2 for p in top)
    files = [p for p in store.root.rglob("*") if p.is_file() and p.name != MARKER]
    assert len(files) == 300
    for f in files:
        digest = hashlib.sha256(f.name.encode()).hexdigest()
        assert f.relative_to(store.root).parts == (digest[:2], digest[2:4], f.name)
    assert len(top) > 100
    assert max(sum(1 for _ in d.rglob("*") if _.is_file()) for d in top) < 10


def test_path_of_is_inside_root_and_stable(store: FilesystemBlobStore) -> None:
    path = store.path_of("abc")
    assert path == store.path_of("abc")
    assert path.name == "abc"
    assert path.parent.parent.parent == store.root


def test_file_holds_exactly_the_bytes_and_no_temp_left(store: FilesystemBlobStore) -> None:
    store.put("k", b"payload")
    assert store.path_of("k").read_bytes() == b"payload"
    assert os.listdir(store.path_of("k").parent) == ["k"]
    assert store.path_of("k").stat().st_mode & 0o777 == 0o600


def test_crash_between_temp_write_and_link_leaves_no_blob(store: FilesystemBlobStore) -> None:
    """A process killed after writing the temp file, before linking it, publishes nothing."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from signd.storage.blobs import FilesystemBlobStore

        def crash(*args, **kwargs):
            os._exit(17)

        store = FilesystemBlobStore(Path({str(store.root)!r}))
        os.link = crash
        store.put("victim", b"secret ciphertext")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert result.returncode == 17
    leftovers = list(store.path_of("victim").parent.iterdir())
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".victim.")
    assert leftovers[0].read_bytes() == b"secret ciphertext"
    with pytest.raises(KeyNotFound):
        store.get("victim")
    store.put("victim", b"second try")
    assert store.get("victim") == b"second try"


def test_put_races_on_link_not_on_exists_check(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer that wins between the existence check and the link still wins."""
    real_link = os.link

    def link_after_rival(src: str, dst: str) -> None:
        Path(dst).write_bytes(b"rival")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_rival)
    with pytest.raises(KeyExists):
        store.put("k", b"mine")
    assert store.get("k") == b"rival"
    assert os.listdir(store.path_of("k").parent) == ["k"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")],
)
def test_os_errors_on_write_are_dependency_unavailable(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    def failing_write(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(DependencyUnavailable, match=reason) as caught:
        store.put("k", b"data")
    assert "'k'" in caught.value.message
    monkeypatch.undo()
    assert os.listdir(store.path_of("k").parent) == []
    with pytest.raises(KeyNotFound):
        store.get("k")


def test_os_error_on_read_is_dependency_unavailable(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("k", b"data")

    def failing_read(self: Path) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    with pytest.raises(DependencyUnavailable, match="Input/output error"):
        store.get("k")


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DependencyUnavailable, match="root folder"):
        FilesystemBlobStore(tmp_path / "file" / "blobs")


def test_check_health_fails_when_root_is_gone(store: FilesystemBlobStore) -> None:
    store.check_health()
    store.marker.unlink()
    store.root.rmdir()
    with pytest.raises(DependencyUnavailable):
        store.check_health()
    with pytest.raises(DependencyUnavailable):
        store.put("k", b"x")


def test_an_empty_folder_in_place_of_the_store_is_unavailable_not_empty(tmp_path: Path) -> None:
    """A volume that is not mounted leaves an empty folder where the blobs were: reading it
    must not answer "no such key", nor writing put new keys on the wrong disk."""
    store = FilesystemBlobStore(tmp_path / "blobs")
    assert store.marker.is_file()
    store.put("old", b"sealed key")
    mounted = tmp_path / "volume"
    store.root.rename(mounted)
    store.root.mkdir()  # the bare mount point
    for attempt in (lambda: store.get("old"), lambda: store.get_range("old", 0, 1)):
        with pytest.raises(DependencyUnavailable, match=r"no \.signd-blob-store marker"):
            attempt()
    with pytest.raises(DependencyUnavailable, match="a volume not mounted"):
        store.put("new", b"sealed key")
    with pytest.raises(DependencyUnavailable):
        store.check_health()
    assert list(store.root.iterdir()) == []  # nothing written to the wrong disk
    assert [FilesystemBlobStore(tmp_path / "blobs").marker.exists()] == [False]  # nor on open

    store.root.rmdir()
    mounted.rename(store.root)  # the volume is back
    store.check_health()
    assert store.get("old") == b"sealed key"
    with pytest.raises(KeyNotFound):
        store.get("never-written")


def test_a_new_empty_store_is_taken_once_its_marker_is_made(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    store = FilesystemBlobStore(tmp_path / "blobs")
    with pytest.raises(DependencyUnavailable, match=re.escape(f"touch {store.marker}")):
        store.put("k", b"x")
    store.marker.touch()
    store.put("k", b"x")
    assert store.get("k") == b"x"


def test_a_store_from_before_the_marker_gets_one(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("k", b"x")
    store.marker.unlink()
    reopened = FilesystemBlobStore(tmp_path / "blobs")
    assert reopened.marker.is_file()
    assert reopened.get("k") == b"x"
