"""The enclave's gate decides a signature whose intent is the client and the key alone (a
message, a hash) once per configuration, and shares that decision between its GATEs: it
depends on nothing else. A new configuration decides again, under its own policy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from signd.audit import SealedAuditRecord
from signd.enclave import gate as enclave_gate
from signd.enclave.gate import EnclaveGate
from signd.enclave.protocol import CreatedKey
from signd.enclave.signer import EnclaveSigner
from signd.kms.local import LocalKms
from signd.policy import PolicyEngine
from signd.storage.blobs import FilesystemBlobStore

TOKEN = "shared-decisions-token"
CLIENTS = f"""
version = 1

[[clients]]
id = "bridge"
scopes = ["sign:message"]
key_labels = ["hot"]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
""".encode()
MESSAGES = b"""
version = 1

[[rules]]
name = "hot-messages"
clients = ["bridge"]
key_labels = ["hot"]
operations = ["sign:message"]
chains = ["ethereum"]
"""
NO_MESSAGES = b"""
version = 1

[[rules]]
name = "hot-keys"
clients = ["bridge"]
key_labels = ["hot"]
operations = ["keys:create"]
chains = ["ethereum"]
"""


@pytest.fixture
def gate_and_keys(tmp_path: Path) -> tuple[EnclaveGate, list[CreatedKey]]:
    kms = LocalKms(tmp_path)
    signer = EnclaveSigner(kms, FilesystemBlobStore(tmp_path / "blobs"))
    gate = EnclaveGate(signer, kms)
    gate.configure({"clients": CLIENTS, "policy": MESSAGES})
    return gate, signer.create_keys("ethereum", 3, labels=["hot"])


def sign_message(gate: EnclaveGate, key: CreatedKey, text: str) -> dict[str, Any]:
    """One GATE that signs ``text`` with ``key``, as the host sends it."""
    body = json.dumps({"key": key.key_id, "message": text}).encode()
    described = key.to_body() | {"ref": key.key_id, "custody": "enclave"}
    return gate.gate(
        {
            "request": {
                "method": "POST",
                "target": "/v1/sign/ethereum/message",
                "body": body,
                "headers": {"Authorization": f"Bearer {TOKEN}"},
            },
            "keys": [described],
            "fills": {},
            "select": [0],
        }
    )


def records(answer: dict[str, Any]) -> list[SealedAuditRecord]:
    return [SealedAuditRecord.from_json(line) for line in answer["audit"]]


def count_checks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The intents the policy engine is asked about from now on."""
    checked: list[object] = []
    check = PolicyEngine.check

    def counted(engine: PolicyEngine, intent: Any, **options: Any) -> Any:
        checked.append(intent)
        return check(engine, intent, **options)

    monkeypatch.setattr(PolicyEngine, "check", counted)
    return checked


def test_gates_of_one_configuration_share_a_decision_on_the_key_alone(
    gate_and_keys: tuple[EnclaveGate, list[CreatedKey]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, (key, other, _) = gate_and_keys
    checked = count_checks(monkeypatch)
    answers = [sign_message(gate, key, f"m{n}") for n in range(3)]
    answers.append(sign_message(gate, other, "m"))
    assert len(checked) == 2  # one decision per key
    for answer in answers:
        assert "signature" in answer["outcomes"][0], answer
        [record] = records(answer)
        assert (record.record.decision, record.record.rule) == ("allowed", "hot-messages")
    assert [records(a)[0].record.key_id for a in answers] == [key.key_id] * 3 + [other.key_id]


def test_a_new_configuration_decides_again_under_its_own_policy(
    gate_and_keys: tuple[EnclaveGate, list[CreatedKey]],
) -> None:
    gate, (key, _, _) = gate_and_keys
    assert "signature" in sign_message(gate, key, "before")["outcomes"][0]
    gate.configure({"clients": CLIENTS, "policy": NO_MESSAGES})
    answer = sign_message(gate, key, "after")
    assert answer["outcomes"][0]["error"]["code"] == "policy_denied"
    [record] = records(answer)
    assert record.record.decision == "refused"
    assert record.record.policy_sha256 == hashlib.sha256(NO_MESSAGES).hexdigest()
    gate.configure({"clients": CLIENTS, "policy": MESSAGES})
    assert "signature" in sign_message(gate, key, "again")["outcomes"][0]


def test_the_shared_decisions_are_bounded(
    gate_and_keys: tuple[EnclaveGate, list[CreatedKey]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, keys = gate_and_keys
    monkeypatch.setattr(enclave_gate, "DECIDED_KEPT", 2)
    checked = count_checks(monkeypatch)
    for key in [*keys, keys[0]]:
        assert "signature" in sign_message(gate, key, "m")["outcomes"][0]
    assert len(checked) == 4  # the third key's decision made room by dropping the others
    configured = gate._configured
    assert configured is not None
    assert len(configured.decided) <= 2
