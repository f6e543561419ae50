"""A gate call authenticates and decides with one clients file and one policy, those of one
configuration, however a reload or GATE_CONFIGURE interleaves with it: reloads are all or
nothing, so a pair never validated together must not be in force even for one call."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.audit import SealedAuditRecord
from signd.auth import sign_request
from signd.auth.reload import Reloadable, ReloadRefusal
from signd.enclave.gate import EnclaveGate
from signd.enclave.signer import EnclaveSigner
from signd.gate import Gatekeeper, GateRequest, SigningCall, SigningKind
from signd.gate.interpret import Limits
from signd.kms.local import LocalKms
from signd.policy import Policy, PolicyEngine
from signd.storage.blobs import FilesystemBlobStore
from tests.gate.support import POLICY, Gated, clients_toml, public_text

KEYS = "/v1/keys?custody=keystore"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_newcomer(clients: str, newcomer: ed25519.Ed25519PrivateKey) -> str:
    """``clients`` and a client ``newcomer`` that may read keys."""
    return (
        clients + '\n[[clients]]\nid = "newcomer"\nscopes = ["keys:read"]\nkey_labels = ["*"]\n'
        f'public_key = "{public_text(newcomer)}"\n'
    )


def gate_body(request: GateRequest) -> dict[str, Any]:
    return {
        "request": {
            "method": request.method,
            "target": request.path,
            "body": request.body,
            "headers": dict(request.headers),
        },
        "keys": [],
        "fills": {},
    }


def test_a_gate_takes_the_clients_and_policy_of_one_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GATE_CONFIGURE that lands while a GATE is under way (after the GATE took the
    configuration, before it authenticated) does not change what that GATE uses: it used
    to replace the clients and the policy in place, one after the other, so the GATE
    authenticated with the new clients and decided and recorded under the old policy."""
    alice, reader = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    newcomer = ed25519.Ed25519PrivateKey.generate()
    old_clients = clients_toml(alice, reader).encode()
    new_clients = with_newcomer(clients_toml(alice, reader), newcomer).encode()
    old_policy, new_policy = POLICY.encode(), POLICY.encode() + b"\n# reviewed\n"
    kms = LocalKms(tmp_path)
    gate = EnclaveGate(EnclaveSigner(kms, FilesystemBlobStore(tmp_path / "blobs")), kms)
    gate.configure({"clients": old_clients, "policy": old_policy})
    read = gate._readings.read
    configured_between: list[Mapping[str, Any]] = []

    def reconfigured_while_reading(request: GateRequest, limits: Limits) -> Any:
        if not configured_between:
            configured_between.append(
                gate.configure({"clients": new_clients, "policy": new_policy})
            )
        return read(request, limits)

    monkeypatch.setattr(gate._readings, "read", reconfigured_while_reading)
    request = GateRequest("GET", KEYS, b"", sign_request("GET", KEYS, b"", "newcomer", newcomer))

    answer = gate.gate(gate_body(request))

    assert configured_between, "the configure did not interleave"
    assert "principal" not in answer, "authenticated with clients its records do not name"
    assert answer["error"]["code"] == "unauthenticated"
    [record] = [SealedAuditRecord.from_json(line).record for line in answer["audit"]]
    assert (record.clients_sha256, record.policy_sha256) == (
        sha256_of(old_clients),
        sha256_of(old_policy),
    )
    again = GateRequest("GET", KEYS, b"", sign_request("GET", KEYS, b"", "newcomer", newcomer))
    assert gate.gate(gate_body(again))["principal"]["client_id"] == "newcomer"
    assert gate.attestation_user_data() == bytes.fromhex(sha256_of(new_policy)) + bytes.fromhex(
        sha256_of(new_clients)
    )


def test_a_caller_is_decided_under_the_clients_it_was_authenticated_with(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """In this process, authentication and signing are two gate calls: a reload between
    them leaves the signing with the configuration the caller was authenticated under
    (it used to be recorded as allowed under a clients file that no longer grants it)."""
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, Gatekeeper)
    paths = gated.paths
    old_clients = paths.clients_file.read_bytes()
    body = b'{"key": "k", "message": "hi"}'
    target = "/v1/sign/ethereum/message"
    caller = gatekeeper.authenticate(
        GateRequest("POST", target, body, sign_request("POST", target, body, "alice", gated.alice))
    )
    without_messages = old_clients.replace(b'"sign:message", ', b"", 1)
    assert without_messages != old_clients
    paths.clients_file.write_bytes(without_messages)
    assert gatekeeper.reload() is None

    [outcome] = gatekeeper.sign(
        caller, [SigningCall(SigningKind.ETH_MESSAGE, hot_key["key_id"], b"hi")]
    )

    assert not isinstance(outcome, Exception), outcome
    record = gated.records()[-1].record
    assert record.decision == "allowed"
    assert record.clients_sha256 == sha256_of(old_clients)


def test_a_reload_does_not_land_between_reading_the_clients_and_the_policy(
    gated: Gated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process gate's configuration in force is read as one pair: a reload that
    would put both files in force between the reads waits for them (it used to swap the
    clients and then the policy, so a gate call could take the old policy and new clients)."""
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, Gatekeeper)
    paths = gated.paths
    old = (sha256_of(paths.policy_file.read_bytes()), sha256_of(paths.clients_file.read_bytes()))
    paths.policy_file.write_bytes(paths.policy_file.read_bytes() + b"\n# reviewed\n")
    paths.clients_file.write_bytes(paths.clients_file.read_bytes() + b"\n# reviewed\n")
    new = (sha256_of(paths.policy_file.read_bytes()), sha256_of(paths.clients_file.read_bytes()))
    staged = threading.Event()
    stage = Reloadable.stage
    stages: list[str] = []

    def counted_stage(self: Reloadable[Any]) -> Any:
        value = stage(self)
        stages.append(self.kind)
        if len(stages) == 2:
            staged.set()
        return value

    refusals: list[ReloadRefusal | None] = []
    reloading = threading.Thread(target=lambda: refusals.append(gatekeeper.reload()))
    policy_of = PolicyEngine.policy.fget
    assert policy_of is not None

    def policy_then_reload(engine: PolicyEngine) -> Policy:
        """The policy read, then (the first time) a reload that runs till it is done or
        waits for the read to finish."""
        value: Policy = policy_of(engine)
        if threading.current_thread() is threading.main_thread() and not reloading.ident:
            reloading.start()
            assert staged.wait(10), "the reload did not read its files"
            reloading.join(0.3)  # long enough for a reload that does not wait
        return value

    monkeypatch.setattr(Reloadable, "stage", counted_stage)
    monkeypatch.setattr(PolicyEngine, "policy", property(policy_then_reload))

    in_force = gatekeeper.in_force()

    reloading.join(10)
    assert refusals == [None]
    assert (in_force.policy.sha256, in_force.clients_sha256) == old
    after = gatekeeper.in_force()
    assert (after.policy.sha256, after.clients_sha256) == new
