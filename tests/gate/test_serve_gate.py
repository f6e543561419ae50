"""How ``signd serve`` opens the enclave's gate: it warns when the enclave it gates through
also signs sealed keys outside the gate, and is quiet when it does not."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.api import ApiSettings
from signd.cli.serve import open_gate
from signd.config import load_settings
from signd.enclave.server import start_enclave
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore
from tests.gate.support import make_home, open_signer

WARNING = "outside its gate: a compromised host could sign what the policy refuses"


@contextlib.contextmanager
def enclave_for(home: Path, address: str, *, gate_only: bool = True) -> Iterator[None]:
    """A ``signd enclave`` in this process, listening on ``address``, for ``home``."""
    server = start_enclave(
        address, LocalKms(home), FilesystemBlobStore(home / "blobs"), gate_only=gate_only
    )
    try:
        yield
    finally:
        server.close()


def open_and_close_gate(home: Path) -> None:
    with open_signer(home) as signer:
        open_gate(load_settings(home), ApiSettings(), signer).gatekeeper.close()


@pytest.mark.parametrize("gate_only", [False, True])
def test_serve_warns_about_an_enclave_that_is_not_gate_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, gate_only: bool
) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="signd-serve-gate-"))
    address = f"unix://{sockets}/enclave.sock"
    home = make_home(tmp_path / "home", address)
    try:
        with (
            enclave_for(home, address, gate_only=gate_only),
            caplog.at_level(logging.INFO, logger="signd.serve"),
        ):
            open_and_close_gate(home)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    messages = [record.getMessage() for record in caplog.records]
    assert any("gate: in the enclave" in message for message in messages)
    assert any(WARNING in message for message in messages) is not gate_only


def test_serve_writes_the_sealed_audit_key_over_an_empty_one_when_the_log_is_empty(
    tmp_path: Path,
) -> None:
    """What a crash while writing it left: an empty audit.key.sealed (from an older signd) or
    a temporary file beside it (from this one). Neither holds a key the log needs, so the
    enclave makes one and its ciphertext takes the empty file's place."""
    sockets = Path(tempfile.mkdtemp(prefix="signd-serve-gate-"))
    address = f"unix://{sockets}/enclave.sock"
    home = make_home(tmp_path / "home", address)
    sealed_key = home / "audit.key.sealed"
    sealed_key.touch(mode=0o600)
    left_behind = home / ".audit.key.sealed.0123456789ab.tmp"
    left_behind.write_bytes(b"a ciphertext whose link never happened")
    try:
        with enclave_for(home, address):
            open_and_close_gate(home)
            written = sealed_key.read_bytes()
            assert written and written != left_behind.read_bytes()
            assert sealed_key.stat().st_mode & 0o777 == 0o600
            open_and_close_gate(home)  # the next start uses it
            assert sealed_key.read_bytes() == written
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
