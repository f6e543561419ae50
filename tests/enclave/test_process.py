"""A real enclave process: killed, the host gets DependencyUnavailable; restarted, it recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.chains import address_deriver
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable
from signd.storage.sqlite import SqliteMetadataStore

REPO = Path(__file__).resolve().parents[2]
DIGEST = b"\x5a" * 32

pytestmark = pytest.mark.integration


class EnclaveProcess:
    def __init__(self, home: Path, socket_path: str) -> None:
        self.home = home
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.enclave.enclave_process",
                str(self.home),
                self.socket_path,
            ],
            cwd=REPO,
        )
        client = EnclaveClient(UnixTransport(self.socket_path), connect_timeout=0.2)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.health()
                break
            except DependencyUnavailable:
                assert self.process.poll() is None, "enclave process exited"
                assert time.monotonic() < deadline, "enclave process did not come up"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[EnclaveProcess]:
    socket_path = f"/tmp/signd-proc-{os.getpid()}-{time.monotonic_ns()}.sock"
    process = EnclaveProcess(tmp_path / "home", socket_path)
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill()
    if os.path.exists(socket_path):
        os.unlink(socket_path)


def test_killed_enclave_is_unavailable_and_recovers_when_restarted(
    enclave: EnclaveProcess, tmp_path: Path
) -> None:
    eth_address = address_deriver("ethereum")
    enclave.start()
    client = EnclaveClient(UnixTransport(enclave.socket_path), timeout=5.0, connect_timeout=0.5)
    backend = EnclaveBackend(client, SqliteMetadataStore(tmp_path / "keys.db"))
    keys = backend.create_keys("ethereum", eth_address, count=10)
    before = [backend.sign_digest(key, DIGEST) for key in keys]

    enclave.kill()
    with pytest.raises(DependencyUnavailable):
        backend.sign_digest(keys[0], DIGEST)
    with pytest.raises(DependencyUnavailable):
        backend.create_keys("ethereum", eth_address)
    with pytest.raises(DependencyUnavailable):
        backend.check_health()

    enclave.start()
    assert [backend.sign_digest(key, DIGEST) for key in keys] == before
    [new] = backend.create_keys("ethereum", eth_address)
    assert backend.sign_digest(new, DIGEST).recover_public_key(DIGEST) == new.public_key
    assert len(backend.list_keys().keys) == 11
    backend.close()
