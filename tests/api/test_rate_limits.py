"""Request rate limits: a token bucket per authenticated client, and one per remote address
drained by failed authentications; 429 ``rate_limited`` with ``Retry-After`` over REST,
HTTP 429 with JSON-RPC -32005 over JSON-RPC, and an error reply over MQTT."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from starlette.requests import Request

from signd.api import ApiSettings, allow_anonymous_for_tests
from signd.api.errors import RateLimited
from signd.api.metrics import ApiMetrics
from signd.api.middleware import TokenBuckets, rate_limited
from signd.api.mqtt import MqttAdapter
from signd.api.openapi import openapi_document
from signd.api.service import Principal, SigningService, UngatedSigner
from signd.errors import ConfigurationError
from signd.gate.errors import Unauthenticated
from signd.operations import Signer
from tests.api.conftest import ClientFactory
from tests.api.mqtt_support import WAIT, Pki, connected, make_pki, running_broker, wait_for
from tests.api.mqtt_support import Device as MqttDevice
from tests.gate.support import Gated

SLOW = 0.001
"""Requests per second low enough that no token comes back during a test."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- token buckets


def test_a_bucket_gives_its_burst_at_once_then_one_token_per_period() -> None:
    clock = Clock()
    buckets = TokenBuckets(2.0, 3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # every key has its own bucket
    clock.now += 0.25
    assert buckets.wait("a") == pytest.approx(0.25)
    assert buckets.take("a") == pytest.approx(0.25)  # a refusal takes nothing
    clock.now += 0.25
    assert buckets.wait("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)


def test_an_idle_bucket_refills_to_its_burst_only() -> None:
    clock = Clock()
    buckets = TokenBuckets(10.0, 2, clock=clock)
    buckets.take("a")
    clock.now += 3600
    assert [buckets.take("a") for _ in range(3)][2] == pytest.approx(0.1)


def test_waiting_takes_nothing() -> None:
    buckets = TokenBuckets(1.0, 1, clock=Clock())
    for _ in range(5):
        assert buckets.wait("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.wait("a") == pytest.approx(1.0)


def test_the_least_recently_used_buckets_are_forgotten_past_the_limit() -> None:
    clock = Clock()
    buckets = TokenBuckets(SLOW, 1, clock=clock, max_keys=2)
    assert buckets.take("a") == buckets.take("b") == 0.0
    assert buckets.take("a") > 0  # a is the most recently used now
    assert buckets.take("c") == 0.0  # forgets b
    assert buckets.take("b") == 0.0  # full again; forgets a
    assert buckets.take("c") > 0


def test_a_charge_is_taken_even_from_an_empty_bucket() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, 2, clock=clock)
    for _ in range(5):
        buckets.charge("a")
    assert buckets.wait("a") == pytest.approx(4.0)  # 2 - 5 = -3 tokens: 4 s to a whole one
    clock.now += 3.5
    assert buckets.wait("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert buckets.take("a") == 0.0


def test_failures_in_flight_together_are_each_paid_for() -> None:
    """Requests from one address all pass the check while its bucket holds a token; when
    they fail, every failure is charged, so the address stays shut for as long as those
    failures cost (not only until the next token)."""
    clock = Clock()
    release = asyncio.Event()
    asked = 0

    async def failing(request: Request) -> Principal:
        nonlocal asked
        asked += 1
        await release.wait()
        raise Unauthenticated("no credentials")

    settings = ApiSettings(auth_failure_rate_limit=1.0, auth_failure_burst=2)
    authenticate = rate_limited(failing, settings, clock=clock)

    def request() -> Request:
        return Request({"type": "http", "client": ("192.0.2.7", 40000), "headers": []})

    async def main() -> list[BaseException | Principal]:
        in_flight = [asyncio.create_task(authenticate(request())) for _ in range(10)]
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*in_flight, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert asked == 10 and all(isinstance(o, Unauthenticated) for o in outcomes)
    clock.now += 1.0  # one token's time: the bucket is still 7 tokens short
    with pytest.raises(RateLimited) as refused_at_once:
        asyncio.run(authenticate(request()))
    assert refused_at_once.value.retry_after == 8
    assert asked == 10
    clock.now += 8.0
    with pytest.raises(Unauthenticated):
        asyncio.run(authenticate(request()))
    assert asked == 11


@pytest.mark.parametrize(
    "table",
    [
        {"rate_limit": -1},
        {"rate_limit": "10"},
        {"rate_limit": float("nan")},
        {"rate_limit_burst": 0},
        {"auth_failure_rate_limit": True},
        {"auth_failure_burst": 1.5},
    ],
)
def test_rate_limit_settings_are_checked(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ApiSettings.from_mapping(table)
    assert next(iter(table)) in raised.value.message


def test_the_defaults_limit_failed_authentications_only() -> None:
    settings = ApiSettings()
    assert settings.rate_limit == 0
    assert settings.auth_failure_rate_limit > 0
    assert rate_limited(allow_anonymous_for_tests, ApiSettings(auth_failure_rate_limit=0)) is (
        allow_anonymous_for_tests
    )


# --------------------------------------------------------------------------- over HTTP


class TokenAuthenticator:
    """``Authorization: Bearer <name>`` is client ``<name>`` unless it is ``bad``; counts
    the requests it was asked about."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> Principal:
        self.calls += 1
        name = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not name or name == "bad":
            raise Unauthenticated("no credentials")
        return Principal(name)


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}"}


def limited(make_client: ClientFactory, signer: Signer, authenticate: Any, **settings: Any) -> Any:
    return make_client(
        ApiSettings(**settings), authenticate=authenticate, gate=UngatedSigner(signer)
    )


def refused(response: Any) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 1 / SLOW + 1
    return dict(response.json())


def test_each_client_has_its_own_rate_over_rest(make_client: ClientFactory, signer: Signer) -> None:
    client = limited(make_client, signer, TokenAuthenticator(), rate_limit=SLOW, rate_limit_burst=2)
    assert [client.get("/v1/keys", headers=bearer("alice")).status_code for _ in range(2)] == [
        200,
        200,
    ]
    error = refused(client.get("/v1/keys", headers=bearer("alice")))["error"]
    assert error["code"] == "rate_limited"
    assert "retry after" in error["message"]
    assert client.get("/v1/keys", headers=bearer("bob")).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes are not limited
    metrics = client.get("/metrics").text
    assert 'signd_errors_total{code="rate_limited"} 1\n' in metrics
    assert 'route="/v1/keys",method="GET",status="429"' in metrics


def test_json_rpc_answers_http_429_with_error_minus_32005(
    make_client: ClientFactory, signer: Signer
) -> None:
    client = limited(make_client, signer, TokenAuthenticator(), rate_limit=SLOW, rate_limit_burst=1)
    call = {"jsonrpc": "2.0", "id": 7, "method": "eth_accounts"}
    assert client.post("/rpc", json=call, headers=bearer("alice")).json()["result"] == []
    answer = refused(client.post("/rpc", json=call, headers=bearer("alice")))
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == -32005
    assert answer["error"]["data"] == {"code": "rate_limited"}
    assert refused(client.post("/", json=[call, call], headers=bearer("alice")))  # a batch too


def test_failed_authentications_close_the_address_before_authenticating(
    make_client: ClientFactory, signer: Signer
) -> None:
    authenticate = TokenAuthenticator()
    client = limited(
        make_client, signer, authenticate, auth_failure_rate_limit=SLOW, auth_failure_burst=3
    )
    assert [client.get("/v1/keys", headers=bearer("bad")).status_code for _ in range(3)] == [
        401,
        401,
        401,
    ]
    asked = authenticate.calls
    assert refused(client.get("/v1/keys", headers=bearer("bad")))["error"]["code"] == "rate_limited"
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"}
    assert (
        refused(client.post("/rpc", json=rpc, headers=bearer("alice")))["error"]["code"] == -32005
    )
    assert authenticate.calls == asked  # refused before any signature check or audit record


def test_successful_authentications_do_not_drain_the_address(
    make_client: ClientFactory, signer: Signer
) -> None:
    client = limited(
        make_client,
        signer,
        TokenAuthenticator(),
        auth_failure_rate_limit=SLOW,
        auth_failure_burst=1,
    )
    for _ in range(5):
        assert client.get("/v1/keys", headers=bearer("alice")).status_code == 200
    assert client.get("/v1/keys", headers=bearer("bad")).status_code == 401
    assert client.get("/v1/keys", headers=bearer("alice")).status_code == 429


def test_by_default_an_address_is_refused_after_its_failed_authentications(
    gated: Gated,
) -> None:
    """The real gatekeeper, default settings: unsigned requests are refused (and audited)
    until the address's bucket is empty; then 429, unaudited."""
    burst = ApiSettings().auth_failure_burst
    before = len(gated.records())
    statuses: list[int] = []
    while len(statuses) < 4 * burst and 429 not in statuses:
        statuses.append(gated.client.get("/v1/keys").status_code)
    assert statuses[-1] == 429
    assert set(statuses[:-1]) == {401} and len(statuses) > burst
    assert len(gated.records()) - before == len(statuses) - 1


def test_the_openapi_document_lists_429_where_requests_are_limited() -> None:
    paths = openapi_document()["paths"]
    for path, method in [
        ("/v1/keys", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys/{key}", "get"),
        ("/v1/sign/hash", "post"),
        ("/v1/sign/batch", "post"),
        ("/rpc", "post"),
        ("/", "post"),
    ]:
        answer = paths[path][method]["responses"]["429"]
        assert "Retry-After" in answer["headers"]
    assert "429" not in paths["/healthz"]["get"]["responses"]


# --------------------------------------------------------------------------- over MQTT


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.integration
def test_mqtt_requests_over_the_rate_get_an_error_reply(
    signer: Signer, pki: Pki, tmp_path: Path
) -> None:
    [key] = signer.create_keys(chain="ethereum", custody="keystore")
    with running_broker(tmp_path / "broker", pki) as broker:
        settings = ApiSettings(
            mqtt=broker.url,
            mqtt_ca=str(pki.ca),
            mqtt_cert=str(pki.signd.cert),
            mqtt_key=str(pki.signd.key),
            rate_limit=SLOW,
            rate_limit_burst=2,
        )
        service = SigningService(signer, settings, ApiMetrics())
        adapter = MqttAdapter(service, rate_limited(allow_anonymous_for_tests, settings))
        request = {"type": "ethereum/message", "key": key.address, "message": "hello"}
        with anyio.from_thread.start_blocking_portal() as portal:
            running = portal.start_task_soon(adapter.run)
            try:
                wait_for(adapter.connected.is_set, "the adapter's subscription")
                with connected(MqttDevice(broker, pki, "device-1", mqtt5=True)) as device:
                    replies = [device.ask(request | {"id": f"m-{n}"}).body for n in range(3)]
            finally:
                portal.call(adapter.stop)
                running.result(timeout=WAIT)
    assert [reply["id"] for reply in replies] == ["m-0", "m-1", "m-2"]
    assert all("result" in reply for reply in replies[:2]), json.dumps(replies)
    assert replies[2]["error"]["code"] == "rate_limited"
    assert "retry after" in replies[2]["error"]["message"]
