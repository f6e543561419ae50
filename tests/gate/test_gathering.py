"""Single signing requests sent together: in this process's gate they are gathered into one
gate call per pass of the event loop (:mod:`signd.api.gathering`), and each still gets its
own decision, its own audit record and its own answer. Through both gates (the enclave's
takes them one by one): what a caller sees must not depend on it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from signd.auth.request_signing import sign_request
from signd.crypto.secp256k1 import PARALLEL_MIN
from signd.gate import Gatekeeper
from signd.gate.keeper import Caller
from signd.gate.operations import SigningCall
from tests.gate.support import (
    BOTH_GATES,
    MAX_PER_TX,
    MAX_PER_WINDOW,
    Gated,
    assert_log_verifies,
    first_fsync_failing,
    transaction,
)

pytestmark = BOTH_GATES

MESSAGE_PATH = "/v1/sign/ethereum/message"


def post_together(
    gated: Gated, requests: Sequence[tuple[str, dict[str, Any]]], path: str = MESSAGE_PATH
) -> list[Any]:
    """Post every ``(client, body)`` to ``path`` at once, on the app's own event loop, each
    signed by its client; the responses in order."""
    keys = {"alice": gated.alice, "reader": gated.reader}

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=gated.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://signd") as client:

            async def post(client_id: str, body: dict[str, Any]) -> httpx.Response:
                content = json.dumps(body).encode()
                headers = sign_request("POST", path, content, client_id, keys[client_id])
                headers["content-type"] = "application/json"
                return await client.post(path, content=content, headers=headers)

            return list(await asyncio.gather(*(post(who, body) for who, body in requests)))

    portal = gated.client.portal
    assert portal is not None
    return portal.call(post_all)


def message_requests(key: dict[str, Any], count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` requests with distinct bodies: alice's messages with ``key``, and every
    fifth one refused, in turn by scope (reader may not sign) and by an unknown key."""
    requests: list[tuple[str, dict[str, Any]]] = []
    for index in range(count):
        body = {"key": key["key_id"], "message": f"gathered {index}"}
        if index % 10 == 4:
            requests.append(("reader", body))
        elif index % 10 == 9:
            requests.append(("alice", body | {"key": "0x" + "99" * 20}))
        else:
            requests.append(("alice", body))
    return requests


@pytest.fixture
def gate_calls(gated: Gated, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests each of the host gate's calls carried (none in the enclave's)."""
    sizes: list[int] = []
    gatekeeper = gated.gatekeeper
    if isinstance(gatekeeper, Gatekeeper):
        real = gatekeeper.sign_each

        def counted(requests: Sequence[tuple[Caller, Sequence[SigningCall]]]) -> Any:
            sizes.append(len(requests))
            return real(requests)

        monkeypatch.setattr(gatekeeper, "sign_each", counted)
    return sizes


@pytest.mark.parametrize("count", [12, PARALLEL_MIN + 16])
def test_requests_sent_together_are_each_decided_recorded_and_answered(
    gated: Gated, hot_key: dict[str, Any], gate_calls: list[int], gate_mode: str, count: int
) -> None:
    """With more requests than :data:`PARALLEL_MIN`, the host gate signs them together.
    (A key must be in memory for its requests to be gathered: the first use signs alone, in
    a thread, as do the requests for a key that does not exist.)"""
    [warm] = post_together(gated, [("alice", {"key": hot_key["key_id"], "message": "warm"})])
    assert warm.status_code == 200, warm.text
    gate_calls.clear()
    requests = message_requests(hot_key, count)
    before = len(gated.records())
    responses = post_together(gated, requests)

    for (client, body), response in zip(requests, responses, strict=True):
        if client == "reader":
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "out_of_scope"
        elif body["key"] != hot_key["key_id"]:
            assert response.status_code == 404, response.text
        else:
            assert response.status_code == 200, response.text
            signature = response.json()["signature"]
            signed = encode_defunct(text=body["message"])
            assert Account.recover_message(signed, signature=signature) == hot_key["address"]

    records = [sealed.record for sealed in gated.records()[before:]]
    assert len(records) == count  # one each: no request's signature joins another's record
    by_request = {record.request_sha256: record for record in records}
    for (client, body), response in zip(requests, responses, strict=True):
        record = by_request[hashlib.sha256(json.dumps(body).encode()).hexdigest()]
        assert record.client_id == client
        assert record.results_sha256 is None
        if response.status_code == 200:
            assert record.decision == "allowed"
            signature = bytes.fromhex(response.json()["signature"][2:])
            assert record.result_sha256 == hashlib.sha256(signature).hexdigest()
        else:
            assert record.decision == "refused"
            assert record.reason == response.json()["error"]["message"]
    assert_log_verifies(gated.gatekeeper, gated.paths)
    if gate_mode == "host":  # gathered: one gate call for those with the key in memory
        assert max(gate_calls) > 1 and sum(gate_calls) == count, gate_calls
        if count > PARALLEL_MIN + count // 10:  # enough with the key in memory to sign together
            assert max(gate_calls) >= PARALLEL_MIN, gate_calls


def test_a_failed_audit_append_withholds_every_gathered_signature(
    gated: Gated,
    hot_key: dict[str, Any],
    gate_calls: list[int],
    gate_mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The records of a gate call are one durable write: if it fails, no request of the
    call gets its signature, and the log goes on whole afterwards."""
    [warm] = post_together(gated, [("alice", {"key": hot_key["key_id"], "message": "warm"})])
    assert warm.status_code == 200, warm.text
    gate_calls.clear()
    requests = [("alice", {"key": hot_key["key_id"], "message": f"m{i}"}) for i in range(6)]
    before = len(gated.records())
    with first_fsync_failing(monkeypatch):
        responses = post_together(gated, requests)
    withheld = [r for r in responses if r.status_code == 503]
    assert withheld, [r.status_code for r in responses]
    if gate_mode == "host":  # all six in one gate call, so in the write that failed
        assert (gate_calls, len(withheld)) == ([6], 6)
    for response in withheld:
        assert response.json()["error"]["code"] == "dependency_unavailable"
        assert "signature" not in response.text
    for response in responses:  # any that were not in the failed write were recorded
        assert response.status_code in (200, 503), response.text
    signed = {
        hashlib.sha256(bytes.fromhex(r.json()["signature"][2:])).hexdigest()
        for r in responses
        if r.status_code == 200
    }
    recorded = {sealed.record.result_sha256 for sealed in gated.records()[before:]}
    assert signed <= recorded

    for request in requests[:2]:  # one at a time, as the enclave resumes its chain first
        [again] = post_together(gated, [request])
        assert again.status_code == 200, again.text
    assert_log_verifies(gated.gatekeeper, gated.paths)


def test_a_spend_window_holds_across_requests_sent_together(
    gated: Gated, hot_key: dict[str, Any], gate_calls: list[int], gate_mode: str
) -> None:
    """Requests gathered into one gate call are decided one after another, each spend
    committed before the next decision: the window lets exactly as many through as it
    holds."""
    [warm] = post_together(gated, [("alice", {"key": hot_key["key_id"], "message": "warm"})])
    assert warm.status_code == 200, warm.text
    gate_calls.clear()
    fits = MAX_PER_WINDOW // MAX_PER_TX
    requests = [
        ("alice", {"key": hot_key["key_id"], "transaction": transaction(value=MAX_PER_TX, nonce=n)})
        for n in range(fits + 2)
    ]
    responses = post_together(gated, requests, "/v1/sign/ethereum/transaction")
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * fits + [403, 403], [r.text for r in responses]
    for response in responses:
        if response.status_code == 403:
            assert response.json()["error"]["rule"] == "hot-eth"
    if gate_mode == "host":
        assert max(gate_calls) > 1, gate_calls
    assert_log_verifies(gated.gatekeeper, gated.paths)


def test_after_a_failed_append_requests_sent_together_are_signed_again(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the log takes records again, the next requests are signed, however many come at
    once. (In enclave custody, the enclave first resumes its chain from the log; requests
    that came meanwhile used to be sealed after the lost records, fail in turn and ask for
    another resume, round after round, while requests kept coming.)"""

    def round_of(name: str) -> list[tuple[str, dict[str, Any]]]:
        return [("alice", {"key": hot_key["key_id"], "message": f"{name} {i}"}) for i in range(10)]

    with first_fsync_failing(monkeypatch):
        failed = post_together(gated, round_of("failing"))
    assert 503 in [response.status_code for response in failed]
    for number in range(4):
        answers = post_together(gated, round_of(f"round {number}"))
        statuses = [response.status_code for response in answers]
        assert statuses == [200] * 10, (number, statuses)
    assert_log_verifies(gated.gatekeeper, gated.paths)
