"""Authentication, scope, policy and audit over MQTT: each message is ``POST /mqtt/<topic>``
signed in MQTT 5 user properties, or a bearer token in the payload's ``auth`` object; a
request delivered twice is signed, spent and audited once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio.from_thread
import pytest

from signd.api import ApiSettings
from signd.api.gatekeeping import GatekeeperGate, gatekeeper_authenticator
from signd.api.metrics import ApiMetrics
from signd.api.mqtt import MqttAdapter
from signd.api.service import SigningService
from signd.auth import sign_request
from tests.api import samples
from tests.api.mqtt_support import (
    WAIT,
    Broker,
    Device,
    Pki,
    connected,
    make_pki,
    running_broker,
    wait_for,
)
from tests.gate.support import BOTH_GATES, MAX_PER_TX, MAX_PER_WINDOW, TOKEN, Gated, transaction

pytestmark = [pytest.mark.integration, BOTH_GATES]

TOPIC = "signd/requests/device-1"
PATH = f"/mqtt/{TOPIC}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    with running_broker(tmp_path_factory.mktemp("broker"), pki) as running:
        yield running


@contextmanager
def gated_adapter(gated: Gated, broker: Broker, pki: Pki, **options: Any) -> Iterator[MqttAdapter]:
    settings = ApiSettings(
        mqtt=broker.url,
        mqtt_ca=str(pki.ca),
        mqtt_cert=str(pki.signd.cert),
        mqtt_key=str(pki.signd.key),
        **options,
    )
    service = SigningService(gated.signer, settings, ApiMetrics(), GatekeeperGate(gated.gatekeeper))
    adapter = MqttAdapter(service, gatekeeper_authenticator(gated.gatekeeper, settings))
    with anyio.from_thread.start_blocking_portal() as portal:
        running = portal.start_task_soon(adapter.run)
        try:
            wait_for(adapter.connected.is_set, "the gated adapter's subscription")
            yield adapter
        finally:
            portal.call(adapter.stop)
            running.result(timeout=WAIT)


def signed_properties(
    gated: Gated, payload: bytes, *, client: str = "alice", **options: Any
) -> list[tuple[str, str]]:
    key = gated.alice if client == "alice" else gated.reader
    key = options.pop("key", key)
    return list(sign_request("POST", PATH, payload, client, key, **options).items())


def test_mqtt_requests_are_authenticated_authorised_and_audited(
    gated: Gated, hot_key: dict[str, Any], broker: Broker, pki: Pki
) -> None:
    def payload(request_id: str, **extra: Any) -> bytes:
        body = {"id": request_id, "type": "ethereum/message", "key": hot_key["address"]}
        return json.dumps(body | {"message": "hello"} | extra).encode()

    tx = json.dumps(
        {"id": "tx", "type": "ethereum/transaction", "key": hot_key["address"]}
        | {"transaction": transaction(chain_id=5)}
    ).encode()
    before = len(gated.records())
    replay = payload("replay")
    replay_props = signed_properties(gated, replay)
    with (  # answers not remembered: the replay reaches the gate, which refuses it
        gated_adapter(gated, broker, pki, mqtt_duplicate_answers=0),
        connected(Device(broker, pki, "device-1", mqtt5=True)) as device,
    ):
        ask = device.ask
        signed = ask(payload("signed"), user_properties=signed_properties(gated, payload("signed")))
        bearer = ask(payload("bearer", auth={"authorization": f"Bearer {TOKEN}"}))
        unsigned = ask(payload("unsigned"))
        wrong = ask(payload("wrong"), user_properties=signed_properties(gated, payload("other")))
        stale = ask(
            payload("stale"),
            user_properties=signed_properties(gated, payload("stale"), now=time.time() - 900),
        )
        first = ask(replay, user_properties=replay_props)
        replayed = ask(replay, user_properties=replay_props)
        scope = ask(
            payload("scope"),
            user_properties=signed_properties(gated, payload("scope"), client="reader"),
        )
        policy = ask(tx, user_properties=signed_properties(gated, tx))

    for reply in (signed, bearer, first):
        assert (
            samples.text_signer("hello", reply.body["result"]["signature"]) == (hot_key["address"])
        )
    for reply, words in (
        (unsigned, "no credentials"),
        (wrong, "does not verify"),
        (stale, "stale timestamp"),
        (replayed, "replayed"),
    ):
        assert reply.body["error"]["code"] == "unauthenticated", reply.body
        assert words in reply.body["error"]["message"]
    assert scope.body["error"]["code"] == "out_of_scope"
    assert policy.body["error"] == {
        "code": "policy_denied",
        "message": "rule hot-eth: chain id 5 is not in chain_ids [1, 11155111]",
        "rule": "hot-eth",
    }

    records = [r.record for r in gated.records()[before:]]
    assert [(r.client_id, r.decision) for r in records if r.operation == "sign:message"] == [
        ("alice", "allowed"),
        ("bridge", "allowed"),
        ("alice", "allowed"),
        ("reader", "refused"),
    ]
    refusals = [r for r in records if r.operation == "authenticate"]
    assert len(refusals) == 4
    assert all(PATH in r.reason for r in refusals)
    assert records[-1].rule == "hot-eth" and records[-1].decision == "refused"
    assert TOKEN not in gated.paths.audit_log.read_text()


BEARER = {"authorization": f"Bearer {TOKEN}"}


def test_a_bearer_request_delivered_twice_is_signed_spent_and_audited_once(
    gated: Gated, hot_key: dict[str, Any], broker: Broker, pki: Pki
) -> None:
    def spend(request_id: str, nonce: int, value: int = MAX_PER_TX) -> dict[str, Any]:
        return {"id": request_id, "type": "ethereum/transaction", "key": hot_key["address"]} | {
            "transaction": transaction(nonce=nonce, value=value)
        }

    assert MAX_PER_WINDOW == 3 * MAX_PER_TX  # the third spend fills the window
    before = len(gated.records())
    with (
        gated_adapter(gated, broker, pki) as adapter,
        connected(Device(broker, pki, "device-1", auth=BEARER)) as device,
    ):
        spent = [device.ask(spend(f"spend-{nonce}", nonce)).body for nonce in (0, 1)]
        first = device.ask(spend("third", 2))
        again = device.ask(spend("third", 2))  # a second spend would exceed the window
        reused = device.ask(spend("third", 3, value=1))
        over = device.ask(spend("over", 3, value=1))
        duplicates = adapter.service.metrics.mqtt_duplicates.value()

    assert all("result" in body for body in spent), spent
    assert "result" in first.body and again.body == first.body
    assert again.topic == first.topic == "signd/replies/device-1"
    raw = first.body["result"]["raw_transaction"]
    assert samples.transaction_signer(raw) == hot_key["address"]
    assert reused.body["id"] == "third"
    assert reused.body["error"]["code"] == "duplicate_request"
    assert reused.body["error"]["field"] == "id"
    assert over.body["error"]["code"] == "policy_denied"
    assert f"on top of {MAX_PER_WINDOW} spent" in over.body["error"]["message"]  # not 4 spends
    assert duplicates == 1

    records = [r.record for r in gated.records()[before:]]
    assert [(r.client_id, r.operation, r.decision) for r in records] == [
        ("bridge", "sign:transaction", "allowed"),
        ("bridge", "sign:transaction", "allowed"),
        ("bridge", "sign:transaction", "allowed"),
        ("bridge", "sign:transaction", "refused"),
    ]
    assert [r.spend.value if r.spend else None for r in records] == [MAX_PER_TX] * 3 + [None]


def test_a_signed_request_delivered_twice_gets_its_answer_twice_and_no_replay_error(
    gated: Gated, hot_key: dict[str, Any], broker: Broker, pki: Pki
) -> None:
    payload = json.dumps(
        {"id": "m-1", "type": "ethereum/message", "key": hot_key["address"], "message": "hello"}
    ).encode()
    properties = signed_properties(gated, payload)
    before = len(gated.records())
    with (
        gated_adapter(gated, broker, pki),
        connected(Device(broker, pki, "device-1", mqtt5=True)) as device,
    ):
        first = device.ask(payload, user_properties=properties, correlation_data=b"c-1")
        again = device.ask(payload, user_properties=properties, correlation_data=b"c-1")

    assert "result" in first.body, first.body
    assert samples.text_signer("hello", first.body["result"]["signature"]) == hot_key["address"]
    assert again.body == first.body
    assert again.correlation_data == first.correlation_data == b"c-1"
    records = [r.record for r in gated.records()[before:]]
    assert [(r.client_id, r.operation, r.decision) for r in records] == [
        ("alice", "sign:message", "allowed")
    ]
