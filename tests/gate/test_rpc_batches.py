"""A JSON-RPC batch through the gates: its members are answered together and in order, its
messages signed in one gate call; the enclave performs a batch of messages while
authenticating it, and reads a batch once however many times it is shown."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from signd.enclave import gate as enclave_gate
from signd.enclave.gate import READINGS_KEPT, _Readings
from signd.errors import InvalidRequest
from signd.gate import GateRequest
from signd.gate.interpret import DEFAULT_LIMITS, Action, Limits, SignCalls
from tests.api import samples
from tests.gate.support import BOTH_GATES, Gated, transaction


def personal_signs(address: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "jsonrpc": "2.0",
            "id": n,
            "method": "personal_sign",
            "params": ["0x" + f"m{n}".encode().hex(), address],
        }
        for n in range(count)
    ]


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the target of each request the enclave's gate reads."""
    read: list[str] = []
    interpret = enclave_gate.interpret

    def counted(method: str, target: str, body: bytes, *, limits: Limits) -> Action:
        read.append(target)
        return interpret(method, target, body, limits=limits)

    monkeypatch.setattr(enclave_gate, "interpret", counted)
    return read


def results_sha256(answers: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(bytes.fromhex(a["result"][2:])).hexdigest() for a in answers)


@BOTH_GATES
def test_a_json_rpc_batch_of_messages_is_one_decision_in_order(
    gated: Gated, hot_key: dict[str, Any], gate_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's message members are signed in one gate call, in order, as a REST batch's
    items: one decision and one record for the key's messages, listing each signature in
    the batch's order (the enclave's gate performs them while authenticating the request)."""
    read = counting_reads(monkeypatch)
    calls = personal_signs(hot_key["address"], 6)
    before = len(gated.records())
    response = gated.signed("POST", "/rpc", calls)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [answer["id"] for answer in answers] == list(range(6))
    for n, answer in enumerate(answers):
        assert samples.bytes_signer(f"m{n}".encode(), answer["result"]) == hot_key["address"]
    records = [sealed.record for sealed in gated.records()[before:]]
    [record] = [r for r in records if r.decision == "allowed"]
    assert record.operation == "sign:message"
    assert record.results_sha256 == results_sha256(answers)
    # the enclave reads the batch once; the host's gate does not use the enclave's reading
    assert read == (["/rpc"] if gate_mode == "enclave" else [])


@pytest.mark.parametrize("gate_mode", ["enclave"], indirect=True)
def test_a_json_rpc_batch_with_a_transaction_is_performed_member_by_member(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction is never performed while authenticating (the host may fill it from its
    node), so a batch that holds one is authenticated first, then shown to the enclave once
    a member that signs, and read once all the same."""
    read = counting_reads(monkeypatch)
    calls: list[dict[str, Any]] = personal_signs(hot_key["address"], 2)
    calls.append(
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "eth_signTransaction",
            "params": [{"from": hot_key["address"], **transaction()}],
        }
    )
    before = len(gated.records())
    response = gated.signed("POST", "/rpc", calls)
    answers = response.json()
    assert [answer["id"] for answer in answers] == [0, 1, 2], response.text
    assert samples.transaction_signer(answers[2]["result"]["raw"]) == hot_key["address"]
    records = [sealed.record for sealed in gated.records()[before:]]
    messages = [r for r in records if r.operation == "sign:message"]
    assert sorted(r.result_sha256 or "" for r in messages) == sorted(results_sha256(answers[:2]))
    assert read == ["/rpc"]


def request(body: bytes, target: str = "/rpc") -> GateRequest:
    return GateRequest("POST", target, body, {})


def test_readings_are_kept_per_request_and_limits() -> None:
    readings = _Readings()
    body = b'[{"jsonrpc": "2.0", "id": 1, "method": "personal_sign", "params": ["0x61", "k"]}]'
    first = readings.read(request(body), DEFAULT_LIMITS)
    assert isinstance(first, SignCalls)
    assert readings.read(request(body), DEFAULT_LIMITS) is first
    assert readings.read(request(body, "/"), DEFAULT_LIMITS) is not first
    assert readings.read(request(body + b" "), DEFAULT_LIMITS) is not first
    tighter = Limits(max_batch=1, max_keys_per_request=DEFAULT_LIMITS.max_keys_per_request)
    assert readings.read(request(body), tighter) is not first


def test_a_request_that_cannot_be_read_is_refused_each_time_and_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = counting_reads(monkeypatch)
    readings = _Readings()
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            readings.read(request(b"[]"), DEFAULT_LIMITS)
    assert len(read) == 2


def test_readings_keep_only_the_latest_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    read = counting_reads(monkeypatch)
    readings = _Readings()
    bodies = [b'{"jsonrpc": "2.0", "id": %d, "method": "eth_accounts"}' % n for n in range(20)]
    for body in bodies:
        readings.read(request(body), DEFAULT_LIMITS)
    for body in bodies[-READINGS_KEPT:]:
        readings.read(request(body), DEFAULT_LIMITS)
    assert len(read) == len(bodies)
    readings.read(request(bodies[0]), DEFAULT_LIMITS)
    assert len(read) == len(bodies) + 1
