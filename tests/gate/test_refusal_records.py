"""Authentication refusals past the gate's audit limit are counted, and each count is sealed
as one record: callers who are not clients cannot grow the audit log faster than the limit,
however many addresses they send from (the host's per-address limit is off here)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from signd.api import ApiSettings
from signd.errors import ConfigurationError
from signd.gate import audit
from signd.gate.audit import COUNTED_FOR, RefusalRecords
from tests.gate.support import BOTH_GATES, assert_log_verifies, open_gated


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(n: int) -> dict[str, Any]:
    return {
        "operation": "authenticate",
        "decision": "refused",
        "reason": f"GET /v1/keys: no credentials ({n})",
        "request_sha256": f"{n:064x}",
        "policy_sha256": "p" * 64,
        "clients_sha256": "c" * 64,
    }


def test_refusals_past_the_limit_are_counted_then_sealed_as_one_record() -> None:
    clock = Clock()
    records = RefusalRecords(1.0, 3, clock=clock)
    assert [records.entries(refusal(n)) for n in range(3)] == [[refusal(n)] for n in range(3)]
    assert [records.entries(refusal(n)) for n in range(3, 10)] == [[]] * 7
    clock.now += 0.5  # half a token: still counted
    assert records.entries(refusal(10)) == []
    clock.now += COUNTED_FOR  # tokens again, and the count is due: sealed first
    count, recorded = records.entries(refusal(11))
    assert recorded == refusal(11)
    assert "request_sha256" not in count
    assert count["operation"] == "authenticate" and count["decision"] == "refused"
    assert count["reason"].startswith("8 more authentication refusals in the last 10 s")
    assert (count["policy_sha256"], count["clients_sha256"]) == ("p" * 64, "c" * 64)
    assert records.entries(refusal(12)) == [refusal(12)]  # the count was sealed once


def test_a_count_is_sealed_even_while_refusals_go_on_past_the_limit() -> None:
    clock = Clock()
    records = RefusalRecords(0.01, 1, clock=clock)
    assert records.entries(refusal(0)) == [refusal(0)]
    sealed = []
    for n in range(1, 40):
        clock.now += 0.5
        sealed += records.entries(refusal(n))
    assert [entry["reason"].split(" more")[0] for entry in sealed] == ["21"]


def test_rate_zero_records_every_refusal() -> None:
    records = RefusalRecords(0.0, 1, clock=Clock())
    assert [records.entries(refusal(n)) for n in range(5)] == [[refusal(n)] for n in range(5)]


@pytest.mark.parametrize(
    "table",
    [{"auth_failure_audit_rate": -1}, {"auth_failure_audit_burst": 0}],
)
def test_the_audit_limit_settings_are_checked(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ApiSettings.from_mapping(table)
    assert next(iter(table)) in raised.value.message


@BOTH_GATES
def test_the_gate_seals_refusals_up_to_its_limit_then_counts_them(
    tmp_path: Path, gate_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ApiSettings(
        auth_failure_rate_limit=0, auth_failure_audit_rate=0.001, auth_failure_audit_burst=5
    )
    with open_gated(tmp_path / "home", gate_mode, settings) as gated:
        before = len(gated.records())
        statuses = [gated.client.get("/v1/keys").status_code for _ in range(20)]
        assert statuses == [401] * 20  # refused all the same, only not all recorded
        refused = [asdict(r.record) for r in gated.records()[before:]]
        assert len(refused) == 5
        assert all(r["request_sha256"] and "no credentials" in r["reason"] for r in refused)

        monkeypatch.setattr(audit, "COUNTED_FOR", 0.2)
        time.sleep(0.3)
        assert gated.client.get("/v1/keys").status_code == 401
        [count] = [asdict(r.record) for r in gated.records()[before + 5 :]]
        assert count["operation"] == "authenticate" and count["decision"] == "refused"
        assert count["request_sha256"] is None
        assert count["reason"].startswith("16 more authentication refusals"), json.dumps(count)

        signed = gated.signed("GET", "/v1/keys")  # a client's requests are unaffected
        assert signed.status_code == 200, signed.text
        assert_log_verifies(gated.gatekeeper, gated.paths)
