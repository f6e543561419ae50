"""How ``signd serve`` opens the enclave's gate: it warns when the enclave it gates through
also signs sealed keys outside the gate, and is quiet when it does not."""

from __future__ import annotations

import logging
import shutil
import tempfile
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


@pytest.mark.parametrize("gate_only", [False, True])
def test_serve_warns_about_an_enclave_that_is_not_gate_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, gate_only: bool
) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="signd-serve-gate-"))
    address = f"unix://{sockets}/enclave.sock"
    home = make_home(tmp_path / "home", address)
    server = start_enclave(
        address, LocalKms(home), FilesystemBlobStore(home / "blobs"), gate_only=gate_only
    )
    try:
        with open_signer(home) as signer, caplog.at_level(logging.INFO, logger="signd.serve"):
            gate = open_gate(load_settings(home), ApiSettings(), signer)
            gate.gatekeeper.close()
    finally:
        server.close()
        shutil.rmtree(sockets, ignore_errors=True)
    messages = [record.getMessage() for record in caplog.records]
    assert any("gate: in the enclave" in message for message in messages)
    assert any(WARNING in message for message in messages) is not gate_only
