"""The MQTT adapter against a real Mosquitto broker over mutual TLS.

``signd serve --mqtt`` runs as a process for the end-to-end cases; the seam and flood cases
run the adapter in-process (over the same broker setup) so that they can hold requests.
Devices are paho clients with their own certificates, MQTT 3.1.1 or 5.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from starlette.requests import Request

from signd.api import ANONYMOUS, ApiSettings, Principal
from signd.api.metrics import ApiMetrics
from signd.api.mqtt import (
    Incoming,
    MqttAdapter,
    RepliesInFlight,
    ReplyTo,
    default_reply,
    read_envelope,
)
from signd.api.service import Authenticator, SigningService, allow_anonymous_for_tests
from signd.api.settings import wildcard_levels
from signd.errors import AccessDenied, ConfigurationError, DependencyUnavailable, InvalidField
from signd.operations import Signer
from tests.api import samples
from tests.api.conftest import make_home
from tests.api.mqtt_support import (
    WAIT,
    Broker,
    ConnectFailed,
    Device,
    Pki,
    connected,
    make_pki,
    running_broker,
    wait_for,
)
from tests.api.processes import AUTH, SigndProcess, signd_serve

pytestmark = pytest.mark.integration

HASH = "0x" + "42" * 32
MAX_BODY = 64 * 1024
NO_KEY = "0x" + "00" * 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    with running_broker(tmp_path_factory.mktemp("broker"), pki) as running:
        yield running


def subscriptions(server: SigndProcess) -> int:
    return server.log.read_text().count("mqtt: subscribed to signd/requests/#")


@contextmanager
def serve_mqtt(home: Path, broker: Broker, pki: Pki) -> Iterator[SigndProcess]:
    """``signd serve --mqtt`` with signd's client certificate, once it has subscribed."""
    make_home(home, extra=f"\n[api]\nmax_body_bytes = {MAX_BODY}\nmqtt_reconnect_max = 2\n")
    options = ["--mqtt", broker.url, "--mqtt-ca", str(pki.ca)]
    options += ["--mqtt-cert", str(pki.signd.cert), "--mqtt-key", str(pki.signd.key)]
    with signd_serve(home, *options) as server:
        wait_for(lambda: subscriptions(server) == 1, "the MQTT subscription")
        yield server


@dataclass
class Served:
    server: SigndProcess
    address: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, broker: Broker, pki: Pki) -> Iterator[Served]:
    with serve_mqtt(tmp_path_factory.mktemp("home"), broker, pki) as server:
        created = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "keystore"},
            timeout=30,
            headers=AUTH,
        )
        yield Served(server, created.json()["keys"][0]["address"])


@pytest.fixture
def device(broker: Broker, pki: Pki) -> Iterator[Device]:
    with connected(Device(broker, pki, "device-1", auth=AUTH)) as client:
        yield client


def test_an_eip1559_transaction_comes_back_signed_by_the_key(
    served: Served, device: Device
) -> None:
    transaction = samples.transaction(chain_id=1, nonce=7)
    request = {"id": "tx-1", "type": "ethereum/transaction", "key": served.address}
    reply = device.ask(request | {"transaction": transaction})

    assert reply.topic == "signd/replies/device-1"
    assert reply.body["id"] == "tx-1" and "error" not in reply.body
    result = reply.body["result"]
    assert result["raw_transaction"].startswith("0x02")
    assert samples.transaction_signer(result["raw_transaction"]) == served.address
    assert result["from"] == served.address
    metrics = httpx.get(f"{served.server.url}/metrics", timeout=10).text
    assert 'kind="ethereum/transaction"} ' in metrics  # the server's own service counted it


def test_message_and_typed_data_with_mqtt5_properties(
    served: Served, broker: Broker, pki: Pki
) -> None:
    with connected(Device(broker, pki, "device-2", mqtt5=True, auth=AUTH)) as device:
        message = device.ask(
            {"type": "ethereum/message", "key": served.address, "message": "hello signd"},
            correlation_data=b"\x00\xffcorr",
        )
        typed = device.ask(
            {"id": 42, "type": "ethereum/typed-data", "key": served.address}
            | {"typed_data": samples.MAIL, "reply_to": "signd/replies/device-1"},
            response_topic="signd/replies/device-2/typed",
            correlation_data=b"typed-1",
        )

    assert message.topic == "signd/replies/device-2"
    assert message.correlation_data == b"\x00\xffcorr"
    assert message.body["id"] == "0x00ff636f7272"  # not UTF-8: hex
    assert samples.text_signer("hello signd", message.body["result"]["signature"]) == (
        served.address
    )
    assert typed.topic == "signd/replies/device-2/typed"  # ResponseTopic over reply_to
    assert typed.correlation_data == b"typed-1"
    assert typed.body["id"] == 42  # the payload's id when there is one
    signature = typed.body["result"]["signature"]
    assert samples.typed_data_signer(samples.MAIL, signature) == served.address


def test_a_device_cannot_make_signd_answer_on_another_devices_reply_topic(
    served: Served, broker: Broker, pki: Pki
) -> None:
    request = {"type": "ethereum/message", "key": served.address, "message": "m"}
    with (
        connected(Device(broker, pki, "device-1", mqtt5=True, auth=AUTH)) as device,
        connected(Device(broker, pki, "device-2", auth=AUTH)) as other,
    ):
        by_payload = device.ask(request | {"id": "p", "reply_to": "signd/replies/device-2"})
        by_property = device.ask(request | {"id": "q"}, response_topic="signd/replies/device-2/x")
        prefix = device.ask(request | {"id": "r", "reply_to": "signd/replies/device-10"})
        wildcard = device.ask(request | {"id": "s"}, response_topic="signd/replies/+")
        own = device.ask(request | {"id": "own", "reply_to": "signd/replies/device-1/mine"})
        others_own = other.ask(request | {"id": "u"})  # after all of device-1's answers

    for reply in (by_payload, by_property, prefix, wildcard):
        assert reply.topic == "signd/replies/device-1", reply  # the default, never the asked
        error = reply.body["error"]
        assert (error["code"], error["field"]) == ("invalid_field", "reply_to")
        assert "own reply topic signd/replies/device-1 or a topic under it" in error["message"]
    assert [r.body["id"] for r in (by_payload, by_property, prefix, wildcard)] == list("pqrs")
    assert own.topic == "signd/replies/device-1/mine" and "result" in own.body
    assert others_own.body["id"] == "u" and "result" in others_own.body
    assert other.replies.empty()  # device-2 got its own answer only


def test_many_requests_with_distinct_ids_are_all_answered(
    served: Served, broker: Broker, pki: Pki, device: Device
) -> None:
    count = 24
    with connected(Device(broker, pki, "device-2", mqtt5=True, auth=AUTH)) as other:
        for index in range(count):
            kind = index % 3
            request: dict[str, Any] = {"id": f"r-{index}", "key": served.address}
            if kind == 0:
                request |= {"type": "ethereum/message", "message": f"message {index}"}
            elif kind == 1:
                request |= {"type": "ethereum/typed-data", "typed_data": samples.MAIL}
            else:
                request |= {
                    "type": "ethereum/transaction",
                    "transaction": samples.transaction(nonce=index),
                }
            device.send(request)
            other.send(request | {"id": f"other-{index}"})
        replies = device.receive(count) + other.receive(count)

    by_id = {reply.body["id"]: reply.body for reply in replies}
    assert set(by_id) == {f"r-{i}" for i in range(count)} | {f"other-{i}" for i in range(count)}
    for index in range(count):
        for name in (f"r-{index}", f"other-{index}"):
            result = by_id[name]["result"]
            if index % 3 == 0:
                signer = samples.text_signer(f"message {index}", result["signature"])
            elif index % 3 == 1:
                signer = samples.typed_data_signer(samples.MAIL, result["signature"])
            else:
                signer = samples.transaction_signer(result["raw_transaction"])
            assert signer == served.address
    assert device.replies.empty() and other.replies.empty()


def metric(served: Served, name: str) -> float:
    text = httpx.get(f"{served.server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_request_published_twice_is_signed_once_and_answered_twice(
    served: Served, device: Device
) -> None:
    request = {"id": "twice", "type": "ethereum/transaction", "key": served.address}
    request |= {"transaction": samples.transaction(chain_id=1, nonce=99)}
    signatures, duplicates = (
        metric(served, "signd_signatures_total{"),
        metric(served, "signd_mqtt_duplicates_total"),
    )
    device.send(request)
    device.send(request)
    first, again = device.receive(2)
    reused = device.ask(request | {"transaction": samples.transaction(chain_id=1, nonce=100)})

    assert "result" in first.body and again.body == first.body
    assert samples.transaction_signer(first.body["result"]["raw_transaction"]) == served.address
    assert reused.body["error"] == {
        "code": "duplicate_request",
        "message": "this id was used by another request (another payload or reply target) "
        "in the last 600 s; give a new request a new id",
        "field": "id",
    }
    assert metric(served, "signd_signatures_total{") == signatures + 1
    assert metric(served, "signd_mqtt_duplicates_total") == duplicates + 1
    assert device.replies.empty()


def test_a_client_without_a_valid_certificate_cannot_connect(broker: Broker, pki: Pki) -> None:
    with connected(Device(broker, pki, "device-1")):
        pass  # the same helper connects with a certificate from the broker's CA

    with pytest.raises(ConnectFailed):
        Device(broker, pki, "device-1", with_certificate=False).connect()
    with pytest.raises(ConnectFailed):
        Device(broker, pki, "device-1", credential=pki.rogue).connect()

    log = broker.log.read_text()
    assert "peer did not return a certificate" in log
    assert "certificate verify failed" in log


@pytest.mark.parametrize(
    ("payload", "reply_id", "code", "field"),
    [
        pytest.param(b'{"id": "broken", "type": ', None, "invalid_request", None, id="not-json"),
        pytest.param(b"[1, 2]", None, "invalid_request", None, id="not-an-object"),
        pytest.param(b'{"id": NaN}', None, "invalid_request", None, id="nan"),
        pytest.param(
            {"type": "ethereum/message", "key": "k", "message": "m"},
            None, "invalid_field", "id", id="no-id",
        ),
        pytest.param({"id": True}, None, "invalid_field", "id", id="bad-id"),
        pytest.param(
            {"id": "t", "type": "bitcoin/psbt", "key": "k"},
            "t", "invalid_field", "type", id="unknown-type",
        ),
        pytest.param(
            {"id": "f", "type": "ethereum/message", "message": "m"},
            "f", "invalid_field", "key", id="missing-field",
        ),
        pytest.param(
            {"id": "x", "type": "ethereum/message", "key": "k", "message": "m", "x": 1},
            "x", "invalid_field", "x", id="unknown-field",
        ),
        pytest.param(
            {"id": "w", "reply_to": "signd/replies/+"},
            "w", "invalid_field", "reply_to", id="wildcard-reply-to",
        ),
        pytest.param(
            {"id": "r", "reply_to": "signd/requests/loop"},
            "r", "invalid_field", "reply_to", id="reply-to-a-request-topic",
        ),
        pytest.param(
            {"id": "a", "auth": {"x-token": 5}}, "a", "invalid_field", "auth", id="bad-auth"
        ),
        pytest.param(
            {"id": "h", "type": "hash", "key": "k", "hash": HASH},
            "h", "blind_signing_disabled", "type", id="blind-hash",
        ),
        pytest.param(
            {"id": "n", "type": "ethereum/message", "key": NO_KEY, "message": "m"},
            "n", "key_not_found", None, id="no-such-key",
        ),
        pytest.param(
            b"{" + b" " * MAX_BODY + b"}", None, "payload_too_large", None, id="oversize"
        ),
    ],
)  # fmt: skip
def test_bad_messages_get_error_replies_and_the_adapter_keeps_serving(
    served: Served,
    device: Device,
    payload: dict[str, Any] | bytes,
    reply_id: str | None,
    code: str,
    field: str | None,
) -> None:
    reply = device.ask(payload)

    assert reply.topic == "signd/replies/device-1"
    assert reply.body["id"] == reply_id
    assert reply.body["error"]["code"] == code
    assert reply.body["error"].get("field") == field
    assert "result" not in reply.body
    good = device.ask(
        {"id": "ok", "type": "ethereum/message", "key": served.address}
        | {"message": "still serving"}
    )
    assert good.body["id"] == "ok" and "result" in good.body
    assert served.server.process.poll() is None
    assert f"answered {code}" in served.server.log.read_text()


def test_the_adapter_reconnects_after_a_broker_restart_and_stops_cleanly(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_broker(tmp_path / "broker", pki) as broker,
        serve_mqtt(tmp_path / "home", broker, pki) as server,
    ):
        address = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "keystore"},
            timeout=30,
            headers=AUTH,
        ).json()["keys"][0]["address"]
        request = {"type": "ethereum/message", "key": address, "message": "m"}
        with connected(Device(broker, pki, "device-1", auth=AUTH)) as device:
            assert "result" in device.ask(request | {"id": "before"}).body

        broker.stop()
        wait_for(lambda: "mqtt: disconnected (" in server.log.read_text(), "disconnect")
        broker.start()
        wait_for(lambda: subscriptions(server) == 2, "resubscription", timeout=30)

        with connected(Device(broker, pki, "device-1", auth=AUTH)) as device:
            after = device.ask(request | {"id": "after"}).body
        assert after["id"] == "after" and "result" in after
        assert server.stop() == 0
        log = server.log.read_text()

    assert 'mqtt: disconnected"' in log  # the clean disconnect at shutdown
    key_text = pki.signd.key.read_text()
    assert key_text.splitlines()[1] not in log  # no client key material in the log


def test_readiness_and_the_connected_gauge_follow_the_broker_connection(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_broker(tmp_path / "broker", pki) as broker,
        serve_mqtt(tmp_path / "home", broker, pki) as server,
    ):

        def readiness() -> tuple[int, dict[str, str]]:
            response = httpx.get(f"{server.url}/readyz", timeout=10)
            (part,) = [part for part in response.json()["parts"] if part["part"] == "mqtt"]
            return response.status_code, part

        def gauge() -> str:
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            (line,) = [
                line for line in metrics.splitlines() if line.startswith("signd_mqtt_connected ")
            ]
            return line

        assert readiness() == (200, {"part": "mqtt", "status": "ok"})
        assert gauge() == "signd_mqtt_connected 1"

        broker.stop()
        wait_for(lambda: readiness()[0] == 503, "not ready without the broker")
        down = readiness()[1]
        assert gauge() == "signd_mqtt_connected 0"

        broker.start()
        wait_for(lambda: readiness()[0] == 200, "ready again", timeout=30)
        assert gauge() == "signd_mqtt_connected 1"

    assert down == {
        "part": "mqtt",
        "status": "unavailable",
        "code": "dependency_unavailable",
        "message": "the MQTT broker is not connected: no requests are taken from signd/requests/#",
    }


# In-process: the authentication seam and the pending-requests limit.


@contextmanager
def adapter_over(
    signer: Signer,
    broker: Broker,
    pki: Pki,
    authenticate: Authenticator = allow_anonymous_for_tests,
    **settings: Any,
) -> Iterator[MqttAdapter]:
    api = ApiSettings(
        mqtt=broker.url,
        mqtt_ca=str(pki.ca),
        mqtt_cert=str(pki.signd.cert),
        mqtt_key=str(pki.signd.key),
        **settings,
    )
    adapter = MqttAdapter(SigningService(signer, api, ApiMetrics()), authenticate)
    with anyio.from_thread.start_blocking_portal() as portal:
        running = portal.start_task_soon(adapter.run)
        try:
            wait_for(adapter.connected.is_set, "the in-process adapter's subscription")
            yield adapter
        finally:
            portal.call(adapter.stop)
            running.result(timeout=WAIT)


@pytest.fixture
def own_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    """A broker of the test's own: no other adapter answers on it."""
    with running_broker(tmp_path / "broker", pki) as running:
        yield running


@pytest.fixture
def address(signer: Signer) -> str:
    return signer.create_keys(chain="ethereum", custody="keystore")[0].address


def test_the_auth_seam_gets_the_headers_and_the_payload(
    signer: Signer, own_broker: Broker, pki: Pki, address: str
) -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def authenticate(request: Request) -> Principal:
        body = await request.body()
        seen.append((request.method, request.url.path, dict(request.headers), body))
        if request.headers.get("x-signd-client") != "device-1":
            raise AccessDenied("who are you?")
        return Principal("device-1")

    message = {"type": "ethereum/message", "key": address, "message": "m"}
    with (
        adapter_over(signer, own_broker, pki, authenticate),
        connected(Device(own_broker, pki, "device-1", mqtt5=True)) as device,
    ):
        in_payload = device.ask(message | {"id": "p", "auth": {"X-Signd-Client": "device-1"}})
        in_properties = device.ask(
            message | {"id": "u"}, user_properties=[("X-Signd-Client", "device-1")]
        )
        refused = device.ask(message | {"id": "n"})
        twice = device.ask(
            message | {"id": "t", "auth": {"x-signd-client": "device-1"}},
            user_properties=[("X-Signd-Client", "device-1")],
        )

    assert "result" in in_payload.body and "result" in in_properties.body
    assert refused.body["error"]["code"] == "access_denied"
    assert twice.body["error"] == {
        "code": "invalid_field",
        "message": "at most 32 auth headers, each given once",
        "field": "auth",
    }
    method, path, headers, body = seen[0]
    assert (method, path) == ("POST", "/mqtt/signd/requests/device-1")
    assert headers["x-signd-client"] == "device-1"
    assert b'"auth": {"X-Signd-Client": "device-1"}' in body  # the payload, as sent
    assert seen[1][2]["x-signd-client"] == "device-1"
    assert len(seen) == 3  # the duplicated header was refused before the seam


def test_requests_over_the_pending_limit_are_answered_too_many_requests(
    signer: Signer, own_broker: Broker, pki: Pki, address: str
) -> None:
    release = threading.Event()
    inside = threading.Semaphore(0)

    async def held(request: Request) -> Principal:
        inside.release()
        await anyio.to_thread.run_sync(release.wait, WAIT)
        return ANONYMOUS

    message = {"type": "ethereum/message", "key": address, "message": "m"}
    with (
        adapter_over(signer, own_broker, pki, held, mqtt_max_pending=2),
        connected(Device(own_broker, pki, "device-1")) as device,
    ):
        device.send(message | {"id": "held-1"})
        device.send(message | {"id": "held-2"})
        assert inside.acquire(timeout=WAIT) and inside.acquire(timeout=WAIT)
        for index in range(3):
            device.send(message | {"id": f"over-{index}"})
        refused = device.receive(3)
        release.set()
        answered = device.receive(2)

    assert {reply.body["id"] for reply in refused} == {"over-0", "over-1", "over-2"}
    assert all(reply.body["error"]["code"] == "too_many_requests" for reply in refused)
    assert {reply.body["id"] for reply in answered} == {"held-1", "held-2"}
    assert all("result" in reply.body for reply in answered)


def test_a_copy_of_a_request_in_hand_gets_its_answer_and_reaches_the_seam_once(
    signer: Signer, own_broker: Broker, pki: Pki, address: str
) -> None:
    release = threading.Event()
    seen: list[str] = []

    async def held(request: Request) -> Principal:
        seen.append(request.url.path)
        await anyio.to_thread.run_sync(release.wait, WAIT)
        return ANONYMOUS

    message = {"id": "held", "type": "ethereum/message", "key": address, "message": "m"}
    with (
        adapter_over(signer, own_broker, pki, held) as adapter,
        connected(Device(own_broker, pki, "device-1")) as device,
    ):
        device.send(message)
        wait_for(lambda: len(seen) == 1, "the first copy at the seam")
        device.send(message)  # delivered again while the first is held
        device.send(message | {"message": "other"})  # the same id, another payload
        (conflict,) = device.receive()
        release.set()
        first, again = device.receive(2)

    assert conflict.body["id"] == "held"
    assert conflict.body["error"]["code"] == "duplicate_request"
    assert "result" in first.body and again.body == first.body
    assert samples.text_signer("m", first.body["result"]["signature"]) == address
    assert len(seen) == 1
    assert signatures(adapter) == 1
    assert adapter.service.metrics.mqtt_duplicates.value() == 1


def test_a_dependency_fault_is_not_remembered_so_the_device_can_ask_again(
    signer: Signer, own_broker: Broker, pki: Pki, address: str
) -> None:
    calls = 0

    async def failing_once(request: Request) -> Principal:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DependencyUnavailable("the gate is not answering")
        return ANONYMOUS

    message = {"id": "retry", "type": "ethereum/message", "key": address, "message": "m"}
    with (
        adapter_over(signer, own_broker, pki, failing_once) as adapter,
        connected(Device(own_broker, pki, "device-1")) as device,
    ):
        fault = device.ask(message)
        retried = device.ask(message)
        again = device.ask(message)

    assert fault.body["error"]["code"] == "dependency_unavailable"
    assert "result" in retried.body and again.body == retried.body
    assert calls == 2
    assert signatures(adapter) == 1
    assert adapter.service.metrics.mqtt_duplicates.value() == 1


def signatures(adapter: MqttAdapter) -> float:
    return adapter.service.metrics.signatures.value("ethereum", "keystore", "ethereum/message")


def test_a_retained_request_is_refused_and_not_delivered_again_at_subscription(
    signer: Signer, own_broker: Broker, pki: Pki, address: str
) -> None:
    message = {"type": "ethereum/message", "key": address, "message": "m"}
    with connected(Device(own_broker, pki, "device-1")) as device:
        try:
            with adapter_over(signer, own_broker, pki) as adapter:
                device.send(message | {"id": "kept"}, retain=True)
                (refused,) = device.receive()
            assert signatures(adapter) == 0  # stopped: what it admitted is answered

            with adapter_over(signer, own_broker, pki) as again:  # subscribes anew
                fresh = device.ask(message | {"id": "fresh"})
            assert signatures(again) == 1  # the fresh request only
        finally:
            device.send(b"", retain=True)  # clears the broker's retained message

    assert refused.topic == "signd/replies/device-1"
    assert refused.body == {
        "id": "kept",
        "error": {
            "code": "invalid_request",
            "message": "a retained message is not a request; publish requests without retain",
        },
    }
    assert fresh.body["id"] == "fresh" and "result" in fresh.body


def test_a_reply_the_broker_refuses_is_logged_with_its_topic(
    signer: Signer,
    own_broker: Broker,
    pki: Pki,
    address: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="signd.api.mqtt")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "refused the reply" in r.getMessage()]

    message = {"id": "x", "type": "ethereum/message", "key": address, "message": "private"}
    with (  # the ACL lets signd write under signd/replies/ only
        adapter_over(signer, own_broker, pki, mqtt_reply_topic="elsewhere/{client}"),
        connected(Device(own_broker, pki, "device-1")) as device,
    ):
        device.send(message)
        wait_for(lambda: bool(refusals()), "the refused reply's warning")

    assert refusals() == [
        "mqtt: the broker refused the reply to elsewhere/device-1: Not authorized"
    ]
    assert "private" not in caplog.text


# Settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mqtt": "mqtt://127.0.0.1:1883"}, "plaintext"),
        ({"mqtt": "https://broker:8883"}, "mqtts://host"),
        ({"mqtt": "mqtts://user:secret@broker"}, "credentials"),
        ({"mqtt": "mqtts://broker", "mqtt_cert": "c.pem"}, "go together"),
        ({"mqtt": "mqtts://broker", "mqtt_request_topic": "signd/#/x"}, "topic filter"),
        ({"mqtt": "mqtts://broker", "mqtt_reply_topic": "signd/requests/{client}"},
         "must not match"),
        ({"mqtt": "mqtts://broker", "mqtt_reply_topic": "replies/+"}, "topic name"),
        ({"mqtt": "mqtts://broker", "mqtt_max_pending": 0}, "positive integer"),
        ({"mqtt": "mqtts://broker", "mqtt_duplicate_answers": -1}, "integer >= 0"),
        ({"mqtt": "mqtts://broker", "mqtt_duplicate_answers": 1.5}, "integer >= 0"),
        ({"mqtt": "mqtts://broker", "mqtt_duplicate_window": -1}, "seconds >= 0"),
        ({"mqtt": "mqtts://broker", "mqtt_duplicate_window": float("inf")}, "seconds >= 0"),
        ({"mqtt": "mqtts://broker", "mqtt_duplicate_window": True}, "seconds >= 0"),
        ({"mqtt": "mqtts://broker", "mqtt_ca": "/nonexistent/ca.pem"}, "cannot load"),
    ],
)  # fmt: skip
def test_mqtt_settings_are_checked_at_start_up(
    signer: Signer, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        MqttAdapter(
            SigningService(signer, ApiSettings(**settings), ApiMetrics()),
            allow_anonymous_for_tests,
        )
    assert message in raised.value.message
    assert "secret" not in raised.value.message


def test_plaintext_only_when_allowed_and_the_address_defaults() -> None:
    assert ApiSettings(mqtt="mqtt://127.0.0.1", mqtt_allow_plaintext=True).mqtt_address() == (
        "127.0.0.1",
        1883,
        False,
    )
    assert ApiSettings(mqtt="mqtts://broker.example").mqtt_address() == (
        "broker.example",
        8883,
        True,
    )


@pytest.mark.parametrize(
    ("topic_filter", "topic", "client"),
    [
        ("signd/requests/#", "signd/requests/device-7", "device-7"),
        ("signd/requests/#", "signd/requests/site/device-7", "site/device-7"),
        ("signd/requests/#", "signd/requests", ""),
        ("$share/signd/signd/requests/+", "signd/requests/device-7", "device-7"),
        ("signd/+/requests", "signd/device-7/requests", "device-7"),
        ("signd/requests/+", "signd/requests/a/b", None),
        ("signd/requests/#", "other/requests/a", None),
    ],
)
def test_the_device_name_is_what_the_wildcards_match(
    topic_filter: str, topic: str, client: str | None
) -> None:
    assert wildcard_levels(topic_filter, topic) == client


SETTINGS = ApiSettings(mqtt="mqtts://broker")


@pytest.mark.parametrize(
    ("message", "topic", "request_id"),
    [
        (Incoming("signd/requests/device-7", b"{}"), "signd/replies/device-7", None),
        (Incoming("signd/requests", b"{}"), None, None),  # names no device: nowhere to reply
        (Incoming("signd/requests", b"{}", "answers/here", b"c-1"), "answers/here", "c-1"),
        (Incoming("signd/requests/d", b"{}", "$SYS/x"), "signd/replies/d", None),
        (Incoming("signd/requests/d", b"{}", "signd/replies/d/x"), "signd/replies/d/x", None),
        (Incoming("signd/requests/d", b"{}", "signd/replies/e"), "signd/replies/d", None),
        (Incoming("signd/requests/d", b"{}", "signd/replies/dd"), "signd/replies/d", None),
        (Incoming("signd/requests/d", b"{}", "signd/requests/e"), "signd/replies/d", None),
        (Incoming("signd/requests", b"{}", "signd/requests/e"), None, None),
    ],
)
def test_the_reply_target_before_the_payload_is_read(
    message: Incoming, topic: str | None, request_id: str | None
) -> None:
    reply = default_reply(message, SETTINGS)
    assert (reply.topic, reply.request_id) == (topic, request_id)


def test_the_envelope_learns_id_and_reply_to_before_refusing() -> None:
    reply = ReplyTo("signd/replies/d")
    message = Incoming(
        "signd/requests/d", b'{"id": "e1", "reply_to": "signd/replies/d/mine", "type": "nope"}'
    )
    body, headers = read_envelope(message, SETTINGS, reply)
    assert body == {"type": "nope"} and headers == []
    assert (reply.topic, reply.request_id) == ("signd/replies/d/mine", "e1")

    reply = ReplyTo("signd/replies/d")
    message = Incoming("signd/requests/d", b'{"id": "e2", "reply_to": "a/#"}')
    with pytest.raises(InvalidField) as raised:
        read_envelope(message, SETTINGS, reply)
    assert raised.value.field == "reply_to"
    assert (reply.topic, reply.request_id) == ("signd/replies/d", "e2")


@pytest.mark.parametrize("response_topic", ["$SYS/x", "a/+", "signd/replies/e", "signd/requests/e"])
def test_a_response_topic_is_checked_like_reply_to(response_topic: str) -> None:
    message = Incoming("signd/requests/d", b'{"id": "e3"}', response_topic)
    reply = default_reply(message, SETTINGS)
    with pytest.raises(InvalidField) as raised:
        read_envelope(message, SETTINGS, reply)
    assert raised.value.field == "reply_to"
    assert "ResponseTopic" in raised.value.message
    assert (reply.topic, reply.request_id) == ("signd/replies/d", "e3")


def test_any_reply_topic_name_will_do_for_a_topic_that_names_no_device() -> None:
    message = Incoming("signd/requests", b'{"id": "e4", "reply_to": "elsewhere/x"}')
    reply = default_reply(message, SETTINGS)
    read_envelope(message, SETTINGS, reply)
    assert reply.topic == "elsewhere/x"


@pytest.mark.parametrize(
    ("request_id", "allowed"),
    [
        (-(2**63), True),
        (2**64 - 1, True),
        (0, True),
        (-(2**63) - 1, False),
        (2**64, False),
        (10**400, False),
    ],
)
def test_an_integer_id_fits_64_bits(request_id: int, allowed: bool) -> None:
    message = Incoming("signd/requests/d", b'{"id": %d}' % request_id)
    reply = ReplyTo("signd/replies/d")
    if allowed:
        read_envelope(message, SETTINGS, reply)
        assert reply.request_id == request_id
    else:
        with pytest.raises(InvalidField) as raised:
            read_envelope(message, SETTINGS, reply)
        assert raised.value.field == "id"
        assert "-2**63 to 2**64-1" in raised.value.message
        assert reply.request_id is None


def test_an_acknowledgement_before_publish_returns_still_finds_its_topic() -> None:
    in_flight = RepliesInFlight()
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    assert in_flight.acknowledged(7, refused) is None  # the PUBACK came first
    assert in_flight.published(7, "signd/replies/a") is refused
    assert in_flight.published(8, "signd/replies/b") is None
    assert in_flight.acknowledged(8, refused) == "signd/replies/b"
