"""``signd audit verify`` while ``signd serve`` runs with the gate in the enclave: the
verification changes nothing in force there. A policy edited on disk but not signalled stays
out of force, ``/readyz`` and the attested files agree with the enclave, and a later SIGHUP
still takes the edit.

Two set-ups with one home: an enclave the service and the CLI share (``[enclave] transport``),
where the CLI's verification also compares the log with that enclave's chain head; and the
service's own auto-started enclave, which the CLI does not reach (it starts one of its own,
on a socket of its own, so it cannot tell a log cut short).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.attestation.document import AttestationDocument, CoseSign1
from signd.auth import sign_request
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import UnixTransport
from tests.api.conftest import PASSPHRASE
from tests.api.processes import SigndProcess, signd_serve
from tests.gate.support import POLICY, clients_toml, make_home, transaction
from tests.gate.test_enclave_gate import start_enclave_process, stop
from tests.integration.support import child_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGN_TX = "/v1/sign/ethereum/transaction"
WIDER = POLICY.replace("chain_ids = [1, 11155111]", "chain_ids = [1, 5, 11155111]")
"""The service's policy loosened to allow chain id 5."""


@dataclass
class Running:
    server: SigndProcess
    home: Path
    alice: ed25519.Ed25519PrivateKey
    enclave_socket: str
    shared: bool
    """Whether the CLI reaches the service's enclave (``[enclave] transport``)."""

    def sign(self, key: dict[str, Any], chain_id: int) -> int:
        body = {"key": key["address"], "transaction": transaction(chain_id=chain_id)}
        content = json.dumps(body).encode()
        headers = sign_request("POST", SIGN_TX, content, "alice", self.alice)
        response = httpx.post(
            self.server.url + SIGN_TX,
            content=content,
            headers={**headers, "content-type": "application/json"},
            timeout=30,
        )
        return response.status_code

    def new_key(self) -> dict[str, Any]:
        body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
        content = json.dumps(body).encode()
        headers = sign_request("POST", "/v1/keys", content, "alice", self.alice)
        response = httpx.post(
            self.server.url + "/v1/keys",
            content=content,
            headers={**headers, "content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        key: dict[str, Any] = response.json()["keys"][0]
        return key

    def in_force(self) -> dict[str, str]:
        reload: dict[str, Any] = httpx.get(f"{self.server.url}/readyz", timeout=30).json()["reload"]
        in_force: dict[str, str] = reload["in_force"]
        return in_force

    def attested(self) -> str:
        """The attestation's user_data from the service's enclave: sha256(policy) ‖
        sha256(clients), hex."""
        client = EnclaveClient(UnixTransport(self.enclave_socket), timeout=10.0)
        try:
            document = client.attestation(os.urandom(16))
        finally:
            client.close()
        user_data = AttestationDocument.decode(CoseSign1.decode(document).payload).user_data
        assert user_data is not None
        return user_data.hex()

    def audit_verify(self, *options: str) -> tuple[int, dict[str, Any]]:
        """``signd audit verify --json`` as a process of its own, with the service's home."""
        env = {**os.environ, "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE}
        env.pop("SIGND_HOME", None)
        command = [sys.executable, "-m", "signd", "--home", str(self.home), "audit", "verify"]
        result = subprocess.run(
            [*command, "--json", *options],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert result.stdout.startswith("{"), result.stdout + result.stderr
        return result.returncode, json.loads(result.stdout)


@pytest.fixture(params=["shared-enclave", "serve-own-enclave"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    shared = request.param == "shared-enclave"
    with ExitStack() as stack:
        sockets = Path(tempfile.mkdtemp(prefix="signd-av-"))
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        address = f"unix://{sockets}/enclave.sock"
        home = make_home(tmp_path / "home", address if shared else None)
        if not shared:  # enclave custody over the local enclave that serve starts
            config = home / "signd.toml"
            config.write_text(config.read_text().replace('["keystore"]', '["enclave", "keystore"]'))
        alice = ed25519.Ed25519PrivateKey.generate()
        (home / "clients.toml").write_text(
            clients_toml(alice, ed25519.Ed25519PrivateKey.generate())
        )
        (home / "policy.toml").write_text(POLICY)
        if shared:
            enclave = start_enclave_process(home, address)
            stack.callback(stop, enclave)
        server = stack.enter_context(signd_serve(home, provision=False))
        if shared:
            socket = f"{sockets}/enclave.sock"
        else:
            [pid] = child_pids(server.process.pid, containing=f"--home {home} enclave")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            socket = command[command.index("--listen") + 1].removeprefix("unix://")
        yield Running(server, home, alice, socket, shared)


def test_audit_verify_puts_no_unsignalled_edit_in_force(running: Running) -> None:
    key = running.new_key()
    assert running.sign(key, 1) == 200
    assert running.sign(key, 5) == 403
    in_force, attested = running.in_force(), running.attested()
    assert attested == in_force["policy_sha256"] + in_force["clients_sha256"]
    enclaves = child_pids(running.server.process.pid, containing=" enclave ")

    (running.home / "policy.toml").write_text(WIDER)  # edited, not signalled
    code, report = running.audit_verify()
    assert code == 0 and report["ok"] and report["where"] == "in the enclave", report
    assert report["records"] == len((running.home / "audit.log").read_bytes().splitlines())
    assert report["truncation_checked"] is running.shared

    assert running.sign(key, 5) == 403  # the edit is not in force
    assert running.in_force() == in_force
    assert running.attested() == attested
    assert child_pids(running.server.process.pid, containing=" enclave ") == enclaves

    running.server.process.send_signal(signal.SIGHUP)  # now it is
    deadline = time.monotonic() + 15
    while running.in_force() == in_force:
        assert time.monotonic() < deadline, running.server.log.read_text()[-2000:]
        time.sleep(0.1)
    assert running.attested() != attested
    assert running.sign(key, 5) == 200


def test_a_log_cut_short_is_caught_by_the_enclave_that_seals_it(
    running: Running, tmp_path: Path
) -> None:
    key = running.new_key()
    assert running.sign(key, 1) == 200
    lines = (running.home / "audit.log").read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(lines[:-1]))
    code, report = running.audit_verify("--log", str(cut))
    if running.shared:
        assert code == 1 and [p["kind"] for p in report["problems"]] == ["truncated"], report
    else:  # an enclave of the CLI's own has no chain to compare the log with
        assert code == 0 and report["ok"] and report["truncation_checked"] is False, report
