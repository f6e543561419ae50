"""Audit records name the policy and clients files their decisions were made under, and
``signd audit verify`` says which ones, from which record on, with either gate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from signd.api import enclave_gatekeeper
from signd.audit import AuditSigner, FileAuditLog
from signd.auth import sign_request
from signd.cli.context import state
from signd.cli.main import app
from signd.gate import Gatekeeper, GateRequest, SigningCall, SigningKind
from signd.gate.errors import PolicyDenied
from signd.gate.setup import load_mac_key
from tests.gate.support import BOTH_GATES, POLICY, Gated, open_gated, transaction

SIGN_TX = "/v1/sign/ethereum/transaction"
WIDER = POLICY.replace("chain_ids = [1, 11155111]", "chain_ids = [1, 5, 11155111]")
"""The test policy, reloaded to allow chain id 5 as well."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(home: Path, *extra: str) -> tuple[int, str]:
    """``signd audit verify`` as the CLI runs it: its exit status and output."""
    state.close()
    result = CliRunner().invoke(app, ["--home", str(home), "audit", "verify", *extra])
    state.close()
    return result.exit_code, result.stdout


def run(from_seq: int, policy: str | None, clients: str | None) -> dict[str, Any]:
    return {"from_seq": from_seq, "policy_sha256": policy, "clients_sha256": clients}


def sign_tx(gated: Gated, key: dict[str, Any], chain_id: int) -> int:
    body = {"key": key["address"], "transaction": transaction(chain_id=chain_id)}
    return int(gated.signed("POST", SIGN_TX, body).status_code)


@BOTH_GATES
def test_records_name_the_policy_in_force_and_a_reload_starts_a_new_run(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = gated.paths
    first, clients = sha256_of(paths.policy_file), sha256_of(paths.clients_file)
    assert sign_tx(gated, hot_key, 1) == 200
    assert sign_tx(gated, hot_key, 5) == 403
    unauthenticated = gated.client.post(SIGN_TX, json={"key": "x", "transaction": {}})
    assert unauthenticated.status_code == 401
    before = len(gated.records())  # the key's creation, two signings, one stranger

    paths.policy_file.write_text(WIDER)
    assert gated.gatekeeper.reload() is None
    second = sha256_of(paths.policy_file)
    assert sign_tx(gated, hot_key, 5) == 200  # what the first policy refused
    assert sign_tx(gated, hot_key, 7) == 403

    records = [sealed.record for sealed in gated.records()]
    assert [record.policy_sha256 for record in records] == [first] * before + [second] * 2
    assert {record.clients_sha256 for record in records} == {clients}
    assert [record.decision for record in records[before:]] == ["allowed", "refused"]

    # Cut the enclave's verification into chunks of two lines: runs cross chunks.
    monkeypatch.setattr(enclave_gatekeeper, "VERIFY_CHUNK", 2)
    code, output = verify(paths.audit_log.parent, "--json")
    report = json.loads(output)
    assert code == 0 and report["ok"], report
    assert report["policies"] == [run(1, first, clients), run(before + 1, second, clients)]
    code, output = verify(paths.audit_log.parent)
    assert code == 0, output
    assert f"from record 1: policy sha256 {first}, clients sha256 {clients}" in output
    assert f"from record {before + 1}: policy sha256 {second}," in output


@BOTH_GATES
@pytest.mark.parametrize("field", ["policy_sha256", "clients_sha256"])
def test_a_changed_policy_hash_is_found_by_audit_verify(
    gated: Gated, hot_key: dict[str, Any], tmp_path: Path, field: str
) -> None:
    """The names are under the MAC: a host that rewrites which policy allowed a signature
    is caught, as for any other field."""
    assert sign_tx(gated, hot_key, 1) == 200
    lines = gated.paths.audit_log.read_text().splitlines()
    named = json.loads(lines[1])["record"][field]
    copy = tmp_path / "tampered.log"
    copy.write_text("\n".join([lines[0], lines[1].replace(named, "0" * 64)]) + "\n")
    code, output = verify(gated.paths.audit_log.parent, "--json", "--log", str(copy))
    report = json.loads(output)
    assert code == 1
    assert [(p["kind"], p["seq"]) for p in report["problems"]] == [("altered", 2)]


def test_a_log_sealed_before_records_named_their_policy_still_verifies(tmp_path: Path) -> None:
    """Records written by an older signd (no ``policy_sha256``) verify as before, and the
    gate's records continue their chain; the summary gives the older ones a run of their
    own."""
    home = tmp_path / "home"
    with open_gated(home, "host") as gated:
        paths = gated.paths
    key = load_mac_key(paths.audit_key_file)
    signer = AuditSigner(key, "old-node")
    with FileAuditLog(paths.audit_log) as log:
        for n in range(3):
            log.append(signer.seal(operation="sign:hash", decision="allowed", reason=f"old {n}"))
    assert "policy_sha256" not in paths.audit_log.read_text()
    with open_gated(home, "host") as gated:
        key_response = gated.signed(
            "POST", "/v1/keys", {"chain": "ethereum", "custody": "keystore", "labels": ["hot"]}
        )
        assert key_response.status_code == 201
        named = [sealed.record.policy_sha256 for sealed in gated.records()]
    policy, clients = sha256_of(paths.policy_file), sha256_of(paths.clients_file)
    assert named == [None, None, None, policy]
    code, output = verify(home, "--json")
    report = json.loads(output)
    assert code == 0 and report["records"] == 4, report
    assert report["policies"] == [run(1, None, None), run(4, policy, clients)]
    code, output = verify(home, "--key", str(paths.audit_key_file))
    assert code == 0 and "from record 1: not named" in output, output


def test_a_gate_call_decides_under_the_policy_its_records_name(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload in the middle of a gate call does not change the policy its later calls are
    decided under: each record names the policy that decided, and what that policy allowed
    is refused once it is no longer in force (rather than decided anew under the other)."""
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, Gatekeeper) and gatekeeper.policy is not None
    holder = gatekeeper.policy
    first = holder.sha256
    caller = gatekeeper.authenticate(
        GateRequest(
            "POST", SIGN_TX, b"{}", sign_request("POST", SIGN_TX, b"{}", "alice", gated.alice)
        )
    )
    sign_hash = gated.signer.sign_hash

    def sign_then_reload(*args: Any) -> Any:
        """Signs, as a policy that allows nothing is put in force."""
        holder.replace(b"version = 1\n")
        return sign_hash(*args)

    monkeypatch.setattr(gated.signer, "sign_hash", sign_then_reload)
    calls = [
        SigningCall(SigningKind.ETH_TRANSACTION, hot_key["key_id"], transaction(nonce=nonce))
        for nonce in range(2)
    ]
    outcomes = gatekeeper.sign(caller, calls)
    assert holder.sha256 != first
    records = [sealed.record for sealed in gated.records()][-2:]
    assert all(isinstance(outcome, PolicyDenied) for outcome in outcomes), outcomes
    assert [record.policy_sha256 for record in records] == [first, first]
    assert [record.rule for record in records] == ["hot-eth", "hot-eth"]
    assert all("reloaded while signing" in record.reason for record in records), records
