"""``signd serve`` with its embedded enclave: the gate runs in the enclave process.

A real ``signd serve`` (which starts ``signd enclave`` itself, over a Unix socket) with a
signing client and a bearer client: signed requests pass, refusals are audited as refused,
replays are refused, a bad policy on SIGHUP is refused and the old one stays, and
``signd audit verify`` checks the log in the enclave (the host holds no MAC key).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.audit import SealedAuditRecord
from signd.auth import sign_request
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import KeyReference
from signd.enclave.transport import UnixTransport
from signd.errors import AccessDenied
from tests.api import samples
from tests.api.conftest import PASSPHRASE, make_home
from tests.api.processes import SigndProcess, signd_serve
from tests.gate.support import POLICY, clients_toml, open_signer, transaction
from tests.integration.support import child_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGN_TX = "/v1/sign/ethereum/transaction"


class Service:
    def __init__(self, process: SigndProcess, home: Path, alice: ed25519.Ed25519PrivateKey):
        self.process = process
        self.home = home
        self.alice = alice

    def signed(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        content = b"" if body is None else json.dumps(body).encode()
        auth = headers or sign_request(method, path, content, "alice", self.alice)
        return httpx.request(
            method,
            self.process.url + path,
            content=content,
            headers={**auth, "content-type": "application/json"},
            timeout=30,
        )

    def records(self) -> list[dict[str, Any]]:
        lines = (self.home / "audit.log").read_bytes().splitlines()
        return [json.loads(SealedAuditRecord.from_json(line).to_json())["record"] for line in lines]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = make_home(tmp_path_factory.mktemp("signd") / "home", ("enclave", "keystore"))
    alice = ed25519.Ed25519PrivateKey.generate()
    reader = ed25519.Ed25519PrivateKey.generate()
    (home / "clients.toml").write_text(clients_toml(alice, reader))
    (home / "policy.toml").write_text(POLICY)
    with signd_serve(home, provision=False) as process:
        yield Service(process, home, alice)


@pytest.fixture(scope="module")
def hot_key(service: Service) -> dict[str, Any]:
    body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    response = service.signed("POST", "/v1/keys", body)
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()["keys"][0]
    return key


def test_the_gate_runs_in_the_enclave_and_the_host_has_no_mac_key(service: Service) -> None:
    log = service.process.log.read_text()
    assert "gate: in the enclave" in log
    assert (service.home / "audit.key.sealed").exists()
    assert not (service.home / "audit.key").exists()


def test_the_enclave_serve_started_signs_sealed_keys_only_through_its_gate(
    service: Service, hot_key: dict[str, Any]
) -> None:
    """A compromised host that talks to serve's own enclave directly, with a key reference
    from the metadata store, gets nothing signed without a GATE."""
    [pid] = child_pids(service.process.process.pid, containing=f"--home {service.home} enclave")
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert "--gate-only" in command
    socket_path = command[command.index("--listen") + 1].removeprefix("unix://")
    with open_signer(service.home) as signer:
        backend = signer.backend("enclave")
        assert isinstance(backend, EnclaveBackend)
        reference = backend.reference(signer.get_key(hot_key["address"]))
    assert isinstance(reference, KeyReference)
    client = EnclaveClient(UnixTransport(socket_path), timeout=10.0)
    try:
        assert client.gate_only()
        with pytest.raises(AccessDenied, match="outside its gate"):
            client.sign_digest(reference, bytes(32))
    finally:
        client.close()
    log = service.process.log.read_text()
    assert "outside its gate: a compromised host" not in log  # serve's warning: not needed


def test_signed_requests_pass_and_refusals_replays_are_audited(
    service: Service, hot_key: dict[str, Any]
) -> None:
    body = {"key": hot_key["address"], "transaction": transaction()}
    content = json.dumps(body).encode()
    headers = sign_request("POST", SIGN_TX, content, "alice", service.alice)
    signed = service.signed("POST", SIGN_TX, body, headers=headers)
    assert signed.status_code == 200, signed.text
    assert samples.transaction_signer(signed.json()["raw_transaction"]) == hot_key["address"]
    replayed = service.signed("POST", SIGN_TX, body, headers=headers)
    assert replayed.status_code == 401
    assert "replayed" in replayed.json()["error"]["message"]

    refused = service.signed(
        "POST", SIGN_TX, {"key": hot_key["address"], "transaction": transaction(chain_id=5)}
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["rule"] == "hot-eth"
    unsigned = httpx.post(service.process.url + SIGN_TX, json=body, timeout=30)
    assert unsigned.status_code == 401

    records = service.records()
    raw = bytes.fromhex(signed.json()["raw_transaction"][2:])
    allowed = [r for r in records if r["result_sha256"] == hashlib.sha256(raw).hexdigest()]
    assert [r["decision"] for r in allowed] == ["allowed"]
    assert records[-1]["operation"] == "authenticate" and records[-1]["decision"] == "refused"
    assert any(r["rule"] == "hot-eth" and r["decision"] == "refused" for r in records)
    assert any("replayed" in r["reason"] for r in records)


def test_audit_verify_runs_in_the_enclave(service: Service, hot_key: dict[str, Any]) -> None:
    env = {**os.environ, "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE}
    env.pop("SIGND_HOME", None)
    command = [sys.executable, "-m", "signd", "--home", str(service.home), "audit", "verify"]
    result = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["where"] == "in the enclave"
    assert report["records"] == len(service.records())


def test_a_bad_policy_on_sighup_is_refused_and_the_old_one_stays(
    service: Service, hot_key: dict[str, Any]
) -> None:
    policy = service.home / "policy.toml"
    good = policy.read_text()
    policy.write_text("version = 1\n[[rules]]\nname = 'broken'\n")
    try:
        service.process.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in service.process.log.read_text():
            assert time.monotonic() < deadline, service.process.log.read_text()[-2000:]
            time.sleep(0.1)
        body = {"key": hot_key["address"], "transaction": transaction(nonce=3)}
        assert service.signed("POST", SIGN_TX, body).status_code == 200
    finally:
        policy.write_text(good)
