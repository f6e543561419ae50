# ruff: noqa: F811 (tests take the imported ``enclave`` fixture as a parameter)
"""Spend windows survive a restart: rebuilt from the audit log's tail, which must verify.

Host mode: a new :class:`Gatekeeper` over the same files. Enclave mode: a new ``signd
enclave`` process, to which the host sends the tail with GATE_CONFIGURE.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signd.api import enclave_gatekeeper
from signd.attestation.document import AttestationDocument, CoseSign1
from signd.audit import SealedAuditRecord, verify_chain
from signd.audit.records import AuditRecord, AuditSigner, Spend
from signd.audit.tail import check_tail, reaches, read_tail
from signd.crypto.secret import Secret
from signd.enclave.protocol import MessageType
from signd.errors import IntegrityError
from signd.gate import (
    Gatekeeper,
    GatePaths,
    GateRequest,
    PolicyDenied,
    SigningCall,
    SigningKind,
    load_mac_key,
    open_gatekeeper,
)
from signd.operations import Signer
from signd.policy import SpendWindowsUnavailable
from tests.gate.support import (
    MAX_PER_TX,
    TOKEN,
    gated_files,
    make_home,
    open_signer,
    transaction,
)
from tests.gate.test_enclave_gate import (
    SIGN_TX,
    Enclave,
    enclave,  # noqa: F401 (a fixture)
    new_key,
    start_enclave_process,
    stop,
    tx_body,
)

START = 1_700_000_000.0
MAC_KEY = Secret(b"k" * 32)
HOUR = 3600
BEARER = GateRequest("POST", "/rpc", b"{}", {"Authorization": f"Bearer {TOKEN}"})


class Clock:
    """The policy's clock, ``ahead`` of the time the audit records are stamped with."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


class HostGate:
    """A signer, the gate files, a hot key and a clock: gatekeepers opened over them."""

    def __init__(self, home: Path) -> None:
        self.paths: GatePaths = gated_files(make_home(home))[0]
        self.signer: Signer = open_signer(home)
        self.clock = Clock()
        self.key = self.signer.create_keys(
            chain="ethereum", custody="keystore", count=1, labels=["hot"]
        )[0]

    def open(self) -> Gatekeeper:
        return open_gatekeeper(self.signer, self.paths, node="test-node", now=self.clock)

    def spend(self, gatekeeper: Gatekeeper, value: int) -> object:
        caller = gatekeeper.authenticate(BEARER)
        call = SigningCall(SigningKind.ETH_TRANSACTION, self.key.address, transaction(value=value))
        return gatekeeper.sign(caller, [call])[0]

    def lines(self) -> list[bytes]:
        return self.paths.audit_log.read_bytes().splitlines()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostGate]:
    gate = HostGate(tmp_path / "home")
    with gate.signer:
        yield gate


def restarted(host: HostGate, gatekeeper: Gatekeeper) -> Gatekeeper:
    gatekeeper.close()
    return host.open()


def test_a_new_gatekeeper_still_counts_the_spends_in_the_window(host: HostGate) -> None:
    gatekeeper = host.open()
    for _ in range(3):
        assert not isinstance(host.spend(gatekeeper, MAX_PER_TX), Exception)
    spent = [SealedAuditRecord.from_json(line).record.spend for line in host.lines()]
    assert spent == [Spend("hot-eth", host.key.key_id, MAX_PER_TX)] * 3

    gatekeeper = restarted(host, gatekeeper)
    refused = host.spend(gatekeeper, 1)
    assert isinstance(refused, PolicyDenied) and refused.rule == "hot-eth"
    assert f"on top of {3 * MAX_PER_TX} spent" in refused.message

    host.clock.ahead = HOUR + 1  # the spends are out of the window
    gatekeeper = restarted(host, gatekeeper)
    assert gatekeeper.engine.spent("hot-eth", host.key.key_id) == 0
    assert not isinstance(host.spend(gatekeeper, MAX_PER_TX), Exception)
    gatekeeper.close()

    report = verify_chain(
        [SealedAuditRecord.from_json(line) for line in host.lines()],
        load_mac_key(host.paths.audit_key_file),
    )
    assert report.ok and report.records == 5  # records with and without a spend


def test_the_tail_is_read_back_to_the_window_only(tmp_path: Path) -> None:
    at = [START]
    signer = AuditSigner(MAC_KEY, "n", now=lambda: at[0])
    path = tmp_path / "audit.log"
    with path.open("w") as log:
        for _ in range(4):
            sealed = signer.seal(operation="sign:hash", decision="allowed", reason="ok")
            log.write(sealed.to_json() + "\n")
            at[0] += HOUR
    tail = read_tail(path, since=START + 2 * HOUR)
    assert [item.record.seq for item in tail] == [3, 4]
    check_tail(tail, MAC_KEY, ends_at=signer.head.hash)
    assert reaches(tail[0], START + 2 * HOUR) and not reaches(tail[1], START + 2 * HOUR)
    assert [item.record.seq for item in read_tail(path, since=START * 2)] == [4]
    assert len(read_tail(path, since=0)) == 4
    assert read_tail(tmp_path / "missing.log", since=0) == []
    with pytest.raises(IntegrityError, match="does not follow"):
        check_tail([tail[1], tail[0]], MAC_KEY, ends_at=tail[0].hash)


def tamper_spend(path: Path, index: int, value: int) -> None:
    lines = path.read_bytes().splitlines()
    data = json.loads(lines[index])
    data["record"]["spend"]["value"] = str(value)
    lines[index] = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_a_tampered_tail_record_stops_the_gatekeeper(host: HostGate) -> None:
    gatekeeper = host.open()
    for _ in range(3):
        host.spend(gatekeeper, MAX_PER_TX)
    gatekeeper.close()
    tamper_spend(host.paths.audit_log, 1, 1)
    with pytest.raises(IntegrityError, match="audit tail record 2 does not verify"):
        host.open()


def test_old_records_without_a_spend_read_and_verify_as_before() -> None:
    old = {
        "seq": 1,
        "time": "2023-11-14T22:13:20.000Z",
        "node": "n",
        "client_id": None,
        "operation": "sign:hash",
        "key_id": None,
        "chain": None,
        "decision": "allowed",
        "rule": "r",
        "reason": "ok",
        "request_sha256": None,
        "result_sha256": None,
    }
    record = AuditRecord.from_dict(old)
    assert record.spend is None
    assert record.canonical() == json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(IntegrityError):
        AuditRecord.from_dict(old | {"spend": {"rule": "r", "key_id": "k", "value": 5}})
    with pytest.raises(IntegrityError):
        AuditRecord.from_dict(old | {"spend": None})


# the enclave process


def spend_over_rest(enclave: Enclave, key: dict[str, Any], nonce: int) -> Any:
    return enclave.gated.signed("POST", SIGN_TX, tx_body(key, value=MAX_PER_TX, nonce=nonce))


def restart(enclave: Enclave, *, configure: bool = True) -> None:
    stop(enclave.process)
    enclave.process = start_enclave_process(enclave.home, enclave.address)
    if configure:
        enclave.gatekeeper.configure()
    time.sleep(1.1)  # a request signed in the second the gate was configured is refused


def spent_three(enclave: Enclave) -> dict[str, Any]:
    hot = new_key(enclave, ["hot"])
    for nonce in range(3):
        response = spend_over_rest(enclave, hot, nonce)
        assert response.status_code == 200, response.text
    return hot


@pytest.mark.parametrize("chunk_bytes", [enclave_gatekeeper.TAIL_CHUNK_BYTES, 1])
def test_a_new_enclave_process_still_counts_the_spends(
    enclave: Enclave, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enclave_gatekeeper, "TAIL_CHUNK_BYTES", chunk_bytes)  # 1: a line each
    hot = spent_three(enclave)
    restart(enclave)
    refused = spend_over_rest(enclave, hot, 3)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["rule"] == "hot-eth"
    assert "exceeds max_value_per_window" in refused.json()["error"]["message"]


def test_a_tampered_tail_is_refused_by_the_enclave(enclave: Enclave) -> None:
    spent_three(enclave)
    lines = enclave.gatekeeper.paths.audit_log.read_bytes().splitlines()
    spending = [i for i, line in enumerate(lines) if SealedAuditRecord.from_json(line).record.spend]
    tamper_spend(enclave.gatekeeper.paths.audit_log, spending[1], 1)
    restart(enclave, configure=False)
    with pytest.raises(IntegrityError, match="does not verify"):
        enclave.gatekeeper.configure()


def test_without_the_whole_tail_the_enclave_refuses_windowed_signing(
    enclave: Enclave,
) -> None:
    hot = spent_three(enclave)
    restart(enclave, configure=False)
    paths = enclave.gatekeeper.paths
    last = enclave.gatekeeper.audit.last_record()
    assert last is not None
    answer = enclave.client.request(  # the head alone: the window is not covered
        MessageType.GATE_CONFIGURE,
        {
            "clients": paths.clients_file.read_bytes(),
            "policy": paths.policy_file.read_bytes(),
            "audit_key": paths.sealed_audit_key_file.read_bytes(),
            "audit_head": last.to_json().encode(),
            "node": "test-node",
        },
    )
    assert answer["windows_ready"] is False
    refused = enclave.gated.signed("POST", SIGN_TX, tx_body(hot, value=1, nonce=4))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == SpendWindowsUnavailable.code
    unwindowed = enclave.gated.signed("POST", SIGN_TX, tx_body(hot, value=0, nonce=5))
    assert unwindowed.status_code == 200, unwindowed.text

    enclave.gatekeeper.configure()  # the host sends the tail: the windows are whole again
    refused = spend_over_rest(enclave, hot, 6)
    assert refused.status_code == 403 and refused.json()["error"]["rule"] == "hot-eth"


def test_a_tail_chunk_that_does_not_verify_leaves_the_files_in_force(enclave: Enclave) -> None:
    """GATE_CONFIGURE used to put the new files in force before it checked the tail chunk
    the windows still wanted: a chunk that did not verify failed the call (the host kept
    the old files as the ones in force) yet the enclave had taken the new ones."""
    spent_three(enclave)
    restart(enclave, configure=False)
    paths = enclave.gatekeeper.paths
    last = enclave.gatekeeper.audit.last_record()
    assert last is not None
    configuration = {
        "clients": paths.clients_file.read_bytes(),
        "policy": paths.policy_file.read_bytes(),
        "audit_key": paths.sealed_audit_key_file.read_bytes(),
        "audit_head": last.to_json().encode(),
        "node": "test-node",
    }
    answer = enclave.client.request(MessageType.GATE_CONFIGURE, configuration)
    assert answer["windows_ready"] is False  # it wants the records before the head
    in_force = files_in_force(enclave)
    lines = paths.audit_log.read_text().splitlines()[:-1]
    spending = [i for i, line in enumerate(lines) if SealedAuditRecord.from_json(line).record.spend]
    tampered = json.loads(lines[spending[0]])
    tampered["record"]["spend"]["value"] = "1"
    lines[spending[0]] = json.dumps(tampered, sort_keys=True, separators=(",", ":"))
    looser = configuration["policy"].replace(b"chain_ids = [1, 11155111]", b"chain_ids = [5]")
    assert looser != configuration["policy"]
    with pytest.raises(IntegrityError, match="does not verify"):
        enclave.client.request(
            MessageType.GATE_CONFIGURE, configuration | {"policy": looser, "audit_tail": lines}
        )
    assert files_in_force(enclave) == in_force


def files_in_force(enclave: Enclave) -> bytes:
    """``sha256(policy) || sha256(clients)`` as the enclave attests them."""
    document = enclave.client.attestation(os.urandom(16))
    user_data = AttestationDocument.decode(CoseSign1.decode(document).payload).user_data
    assert user_data is not None
    return user_data


def pay_with_token(enclave: Enclave, key: dict[str, Any], value: int, nonce: int) -> Any:
    """A spend by the bearer client ``bridge`` (no request time: any enclave takes it)."""
    body = tx_body(key, value=value, nonce=nonce)
    return enclave.gated.signed("POST", SIGN_TX, body, headers={"authorization": BEARER_AUTH})


BEARER_AUTH = f"Bearer {TOKEN}"


def test_a_spend_still_being_written_when_the_enclave_restarts_is_counted(
    enclave: Enclave, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enclave dies while the host is still writing a spend it committed (the disk is
    slow). The spend is released once written, so the new enclave's windows must hold it:
    the host configures it only once that write is over, not from the log as it was before."""
    hot = new_key(enclave, ["hot"])
    for nonce in range(2):
        assert pay_with_token(enclave, hot, MAX_PER_TX, nonce).status_code == 200
    writing, disk_done = threading.Event(), threading.Event()
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if not writing.is_set():
            writing.set()
            disk_done.wait(30)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    answers: dict[str, Any] = {}
    third = threading.Thread(
        target=lambda: answers.update(third=pay_with_token(enclave, hot, MAX_PER_TX, 2))
    )
    third.start()
    assert writing.wait(30)  # its record is on its way to the disk
    stop(enclave.process)
    enclave.process = start_enclave_process(enclave.home, enclave.address)
    fourth = threading.Thread(
        target=lambda: answers.update(fourth=pay_with_token(enclave, hot, 1, 3))
    )
    fourth.start()  # finds the new enclave unconfigured, and configures it
    fourth.join(2)
    disk_done.set()
    third.join(30)
    fourth.join(30)

    assert answers["third"].status_code == 200, answers["third"].text  # the window is full
    for answer in (answers["fourth"], pay_with_token(enclave, hot, MAX_PER_TX // 2, 4)):
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["rule"] == "hot-eth"
        assert f"on top of {3 * MAX_PER_TX} spent" in answer.json()["error"]["message"]
