"""signd.files: a file appears whole or not at all, never over another, mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signd import files


def test_write_new_creates_once_and_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert files.write_new(path, b"first")
    assert not files.write_new(path, b"second")
    assert path.read_bytes() == b"first"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temporary file left


def test_replace_writes_over_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    files.replace(path, b"old")
    files.replace(path, b"new", 0o640)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(descriptor: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        files.write_new(tmp_path / "key", b"data")
    with pytest.raises(OSError):
        files.replace(tmp_path / "key", b"data")
    assert list(tmp_path.iterdir()) == []
