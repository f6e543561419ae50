"""An enclave answer that cannot be encoded still delivers its sealed audit records: they
are part of the chain already, and the host must append them before any later ones."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from signd.audit import SealedAuditRecord
from signd.enclave.gate import EnclaveGate
from tests.gate.support import GATE_MODES, Gated, assert_log_verifies

pytestmark = pytest.mark.parametrize("gate_mode", [GATE_MODES[1]], indirect=True)

SIGNING = "/v1/sign/ethereum/message"


@pytest.fixture
def spoiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The enclave's first GATE answer to a signing request gets a field holding text
    without a UTF-8 form (CBOR has none for it either). Set up before the enclave starts,
    which binds its handlers."""
    gate = EnclaveGate.gate
    targets: list[str] = []

    def spoiling(self: EnclaveGate, body: Mapping[str, Any]) -> dict[str, Any]:
        answer = gate(self, body)
        if not targets and body["request"]["target"] == SIGNING:
            targets.append(SIGNING)
            answer["note"] = "\ud800"
        return answer

    monkeypatch.setattr(EnclaveGate, "gate", spoiling)
    return targets


def test_the_records_of_an_answer_that_cannot_be_encoded_are_kept(
    spoiled: list[str], gated: Gated, hot_key: dict[str, Any]
) -> None:
    """One GATE answer cannot be encoded. The request fails (500, the enclave's fault), its
    records still reach the log, and the next request signs at once: no record is missing,
    so nothing waits for one and no resume is needed."""
    before = len(gated.records())
    failed = gated.signed("POST", SIGNING, {"key": hot_key["key_id"], "message": "spoiled"})
    assert failed.status_code == 500, failed.text
    assert failed.json()["error"]["message"] == "the enclave could not encode its answer"
    assert spoiled == [SIGNING]
    assert len(gated.records()) > before  # the sealed records were appended

    started = time.monotonic()
    again = gated.signed("POST", SIGNING, {"key": hot_key["key_id"], "message": "next"})
    assert again.status_code == 200, again.text
    assert time.monotonic() - started < 2.0
    records: list[SealedAuditRecord] = gated.records()
    assert all(item.record.operation != "audit:resume" for item in records)
    assert assert_log_verifies(gated.gatekeeper, gated.paths) == len(records)
