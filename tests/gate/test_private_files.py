"""The gate's private files (audit.key, audit.key.sealed, dev-client.key): written whole or
not at all, 0600, never over a key; an empty one, left by a crash, counts as missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from signd.errors import ConfigurationError
from signd.gate import GatePaths, load_mac_key
from signd.gate.setup import DEV_CLIENT_KEY, write_dev_defaults, write_private

KEY_TEXT = b"ab" * 32 + b"\n"


def test_a_written_file_is_the_owners_only_and_alone_in_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    write_private(path, KEY_TEXT)
    assert path.read_bytes() == KEY_TEXT
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ["audit.key"]  # no temporary file left


def test_an_empty_file_left_by_a_crash_is_written_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.key.sealed"
    path.touch(mode=0o600)
    write_private(path, b"ciphertext")
    assert path.read_bytes() == b"ciphertext"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_file_with_content_is_never_written_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.key.sealed"
    path.write_bytes(b"the key in use")
    with pytest.raises(ConfigurationError, match=r"audit\.key\.sealed exists already"):
        write_private(path, b"another key")
    assert path.read_bytes() == b"the key in use"
    assert os.listdir(tmp_path) == ["audit.key.sealed"]


def test_a_crash_before_the_key_has_its_name_leaves_no_key_and_the_next_start_makes_one(
    tmp_path: Path,
) -> None:
    """The process dies once the temporary file is synced, before it is linked: there is no
    audit.key, empty or not, and the temporary file left behind is not taken for it."""
    path = tmp_path / "audit.key"
    crash = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from signd.gate import load_mac_key

        os.link = lambda source, target: os._exit(9)
        load_mac_key(Path({str(path)!r}), create=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert not path.exists()
    [left] = [entry for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]
    key = load_mac_key(path, create=True)
    assert len(key.reveal_bytes()) == 32
    assert path.read_bytes() != left.read_bytes()  # a new key, not the one the crash lost


def test_an_empty_audit_key_with_no_log_yet_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    path.touch(mode=0o600)
    key = load_mac_key(path, create=True)
    assert bytes.fromhex(path.read_text()) == key.reveal_bytes()
    assert len(key.reveal_bytes()) == 32


def test_an_empty_audit_key_beside_a_log_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    path.touch(mode=0o600)
    with pytest.raises(ConfigurationError, match="is empty: restore the key file"):
        load_mac_key(path, create=False)
    assert path.read_bytes() == b""


def test_a_development_key_left_without_its_clients_file_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    """A first run that stopped after writing the key: the next one says so, not a traceback."""
    (tmp_path / DEV_CLIENT_KEY).write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError, match=r"dev-client\.key exists already"):
        write_dev_defaults(tmp_path, GatePaths.under(tmp_path))
