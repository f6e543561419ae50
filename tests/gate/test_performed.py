"""A REST signing request through the enclave's gate is authenticated and performed in one
round trip; the endpoint then takes its outcome from what the enclave answered
(:meth:`~signd.api.enclave_gatekeeper.EnclaveGatekeeper.performed`), without another gate
call, unless handing it out needs I/O on the host (a digest the enclave approved for a key
whose custody is not in memory), which then runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from signd.api import rest
from signd.api.gathering import Gathering
from signd.custody.base import KeyInfo
from signd.gate.operations import SigningCall
from tests.gate.support import Gated, new_hot_key, transaction

pytestmark = pytest.mark.parametrize("gate_mode", ["enclave"], indirect=True)


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def gathered(monkeypatch: pytest.MonkeyPatch) -> list[SigningCall]:
    """The calls the service handed to its gathering (the path of calls still to sign)."""
    seen: list[SigningCall] = []
    real = Gathering.sign

    async def sign(self: Gathering[Any], principal: Any, call: SigningCall) -> Any:
        seen.append(call)
        return await real(self, principal, call)

    monkeypatch.setattr(Gathering, "sign", sign)
    return seen


def sign_message(gated: Gated, key: dict[str, Any], text: str) -> None:
    response = gated.signed(
        "POST", "/v1/sign/ethereum/message", {"key": key["key_id"], "message": text}
    )
    assert response.status_code == 200, response.text
    signature = response.json()["signature"]
    signed = encode_defunct(text=text)
    assert Account.recover_message(signed, signature=signature) == key["address"]


@pytest.mark.parametrize("custody", ["enclave", "keystore"])
def test_a_performed_request_is_answered_without_another_gate_call(
    gated: Gated, gathered: list[SigningCall], custody: str
) -> None:
    key = new_hot_key(gated, custody)
    sign_message(gated, key, "warm")  # a keystore key's first use unlocks it, in a thread
    gathered.clear()
    before = len(gated.records())
    for text in ("first", "second"):
        sign_message(gated, key, text)
    assert gathered == []
    assert [sealed.record.decision for sealed in gated.records()[before:]] == ["allowed"] * 2


def test_a_digest_approved_for_a_key_not_in_memory_is_signed_off_the_event_loop(
    gated: Gated, gathered: list[SigningCall], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of the host's custody that is not in memory (an HSM or KMS key, say) signs with
    I/O: never on the event loop, where it would stall every other request."""
    key = new_hot_key(gated, "keystore")
    monkeypatch.setattr(gated.signer, "key_is_local", lambda ref: False)
    threads: list[tuple[str, bool]] = []
    real_sign_hash = gated.signer.sign_hash

    def sign_hash(info: KeyInfo, digest: bytes) -> Any:
        threads.append((threading.current_thread().name, on_event_loop()))
        return real_sign_hash(info, digest)

    monkeypatch.setattr(gated.signer, "sign_hash", sign_hash)
    sign_message(gated, key, "from a key not in memory")
    tx_response = gated.signed(
        "POST",
        "/v1/sign/ethereum/transaction",
        {"key": key["key_id"], "transaction": transaction()},
    )
    assert tx_response.status_code == 200, tx_response.text
    raw = tx_response.json()["raw_transaction"]
    assert Account.recover_transaction(raw) == key["address"]
    assert len(threads) == 2
    assert not any(loop for _, loop in threads), threads
    assert len(gathered) == 2  # not handed out in place: signed through the gate's thread path


@pytest.fixture
def api_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The signing requests and batch items the REST API parsed itself."""
    seen: list[object] = []
    for name in ("parse_signing_request", "parse_batch_item"):
        real = getattr(rest, name)

        def parse(*args: Any, real: Any = real) -> Any:
            seen.append(args)
            return real(*args)

        monkeypatch.setattr(rest, name, parse)
    return seen


@pytest.mark.parametrize("custody", ["enclave", "keystore"])
def test_the_api_takes_the_calls_the_gate_read_rather_than_parse_the_body_again(
    gated: Gated, api_reads: list[object], custody: str
) -> None:
    key = new_hot_key(gated, custody)
    sign_message(gated, key, "one")
    items = [
        {"type": "ethereum/message", "key": key["key_id"], "message": f"m{n}"} for n in range(3)
    ]
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    signed = [encode_defunct(text=f"m{n}") for n in range(3)]
    assert [
        Account.recover_message(message, signature=result["signature"])
        for message, result in zip(signed, results, strict=True)
    ] == [key["address"]] * 3
    assert api_reads == []


def test_a_body_the_gate_could_not_read_is_refused_by_the_apis_own_reading(
    gated: Gated, api_reads: list[object]
) -> None:
    response = gated.signed("POST", "/v1/sign/ethereum/message", {"key": "k", "message": 7})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "message"
    assert len(api_reads) == 1
