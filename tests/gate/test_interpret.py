"""The trusted interpreter: what a request asks for, derived from its method, target and body;
and the host deriving the same calls through the API (a property test), so they cannot drift."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from signd.api import ApiSettings, allow_anonymous_for_tests, create_app
from signd.api.errors import wire_error
from signd.api.metrics import ApiMetrics
from signd.api.mqtt import Incoming, ReplyTo, read_envelope
from signd.api.rpc import JsonRpcApi
from signd.api.service import Principal, SigningService
from signd.custody.base import KeyInfo, KeyPage
from signd.errors import AccessDenied, InvalidField, InvalidRequest, KeyNotFound, SigndError
from signd.gate import Signed, SigningCall, SigningKind
from signd.gate.inputs import RPC_SIGNING_METHODS, parse_mqtt_request
from signd.gate.interpret import (
    FILLABLE,
    CreateKeys,
    Limits,
    NoSigning,
    ReadKeys,
    SignCalls,
    apply_fills,
    interpret,
)
from signd.operations import Signer
from tests.api.samples import MAIL
from tests.gate.support import make_home, open_signer

ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
OTHER = "0x3535353535353535353535353535353535353535"
DIGEST = "0x" + "ab" * 32
TX = {"from": ADDRESS, "to": OTHER, "value": "0x1", "nonce": "0x0", "gas": "0x5208"}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def rpc(method: str, params: Any, request_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def sign_calls(method: str, target: str, data: bytes) -> SignCalls:
    action = interpret(method, target, data)
    assert isinstance(action, SignCalls), action
    return action


def read_keys(target: str, method: str = "GET") -> ReadKeys:
    action = interpret(method, target, b"")
    assert isinstance(action, ReadKeys), action
    return action


def refused(method: str, target: str, data: bytes = b"") -> SigndError:
    with pytest.raises(InvalidRequest) as raised:
        interpret(method, target, data)
    return raised.value


# keys


def test_create_keys_with_defaults_and_in_full() -> None:
    plain = interpret("POST", "/v1/keys", body({"chain": "ethereum", "custody": "keystore"}))
    assert plain == CreateKeys("ethereum", "keystore", 1, ())
    full = {"chain": "bitcoin", "custody": "enclave", "count": 3, "labels": ["hot", "eu"]}
    assert interpret("POST", "/v1/keys", body(full)) == CreateKeys(
        "bitcoin", "enclave", 3, ("hot", "eu")
    )


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"chain": "ethereum", "custody": "keystore", "colour": "red"}, "colour"),
        ({"custody": "keystore"}, "chain"),
        ({"chain": "ethereum", "custody": ""}, "custody"),
        ({"chain": "ethereum", "custody": "keystore", "count": 0}, "count"),
        ({"chain": "ethereum", "custody": "keystore", "count": True}, "count"),
        ({"chain": "ethereum", "custody": "keystore", "count": 11}, "count"),
        ({"chain": "ethereum", "custody": "keystore", "labels": "hot"}, "labels"),
    ],
)
def test_create_keys_names_the_wrong_field(value: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as raised:
        interpret("POST", "/v1/keys", body(value), limits=Limits(max_keys_per_request=10))
    assert raised.value.field == field


def test_read_one_key_by_its_percent_decoded_reference() -> None:
    assert interpret("GET", f"/v1/keys/{ADDRESS}", b"") == ReadKeys(
        ADDRESS, None, None, None, None, 1
    )
    assert read_keys("/v1/keys/key%2D1", "HEAD").key == "key-1"
    assert "query" in refused("GET", "/v1/keys/k?x=1").message
    refused("GET", "/v1/keys/a%2Fb")  # a/b: no such route, as in Starlette
    refused("GET", "/v1/keys/%ff")  # not UTF-8
    refused("POST", "/v1/keys/k")


def test_list_keys_from_the_query() -> None:
    assert interpret("GET", "/v1/keys", b"") == ReadKeys(None, None, None, "keystore", None, 100)
    target = "/v1/keys?custody=hsm&chain=ethereum&label=cold+store&cursor=c%2F1&limit=7"
    assert interpret("GET", target, b"") == ReadKeys(
        None, "ethereum", "cold store", "hsm", "c/1", 7
    )
    empty = interpret("GET", "/v1/keys?custody=&chain=&label=&cursor=", b"")
    assert empty == ReadKeys(None, None, None, "keystore", None, 100)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("lable=cold", "lable"),
        ("label=a&label=b", "label"),
        ("limit=", "limit"),
        ("chain", None),  # no '='
        ("label=%ff", None),  # not UTF-8
        ("a=1&&b=2", None),
    ],
)
def test_list_keys_refuses_a_bad_query(query: str, field: str | None) -> None:
    error = refused("GET", f"/v1/keys?{query}")
    assert error.field == field


# signing requests


@pytest.mark.parametrize(
    ("path", "value", "call"),
    [
        ("hash", {"key": "k", "hash": DIGEST}, SigningCall(SigningKind.HASH, "k", b"\xab" * 32)),
        (
            "ethereum/transaction",
            {"key": "k", "transaction": TX},
            SigningCall(SigningKind.ETH_TRANSACTION, "k", TX),
        ),
        (
            "ethereum/message",
            {"key": "k", "message": "hi"},
            SigningCall(SigningKind.ETH_MESSAGE, "k", b"hi"),
        ),
        (
            "ethereum/message",
            {"key": "k", "message": {"hex": "0x00ff"}},
            SigningCall(SigningKind.ETH_MESSAGE, "k", b"\x00\xff"),
        ),
        (
            "ethereum/typed-data",
            {"key": "k", "typed_data": MAIL},
            SigningCall(SigningKind.ETH_TYPED_DATA, "k", MAIL),
        ),
    ],
)
def test_each_sign_route_is_one_call(path: str, value: dict[str, Any], call: SigningCall) -> None:
    assert interpret("POST", f"/v1/sign/{path}", body(value)) == SignCalls((call,), (0,))


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("hash", {"key": "k", "hash": "0x12"}, "hash"),
        ("hash", {"key": "k", "hash": DIGEST, "note": "x"}, "note"),
        ("ethereum/transaction", {"key": "k", "transaction": []}, "transaction"),
        ("ethereum/message", {"message": "m"}, "key"),
        ("ethereum/message", {"key": "k", "message": {"hex": "0x1"}}, "message.hex"),
        ("ethereum/message", {"key": "k", "message": "\ud800"}, "message"),
        ("ethereum/typed-data", {"key": "k", "typed_data": "{}"}, "typed_data"),
    ],
)
def test_sign_routes_name_the_wrong_field(path: str, value: Any, field: str) -> None:
    assert refused("POST", f"/v1/sign/{path}", body(value)).field == field


def test_bodies_must_be_json_objects() -> None:
    assert "not valid JSON" in refused("POST", "/v1/sign/hash", b"{").message
    assert "not valid JSON" in refused("POST", "/v1/sign/hash", b'{"a": NaN}').message
    assert "out of range" in refused("POST", "/v1/sign/hash", b'{"a": -1e400}').message
    twice = refused("POST", "/v1/sign/batch", b'{"requests": [{"key": "a", "key": "b"}]}')
    assert "'key' is given twice" in twice.message
    assert "JSON object" in refused("POST", "/v1/keys", b"[]").message


def test_a_batch_is_its_items_in_order_each_with_its_index() -> None:
    items = [
        {"type": "ethereum/message", "key": "a", "message": "one"},
        {"type": "hash", "key": "b", "hash": DIGEST},
        {"type": "ethereum/transaction", "key": "c", "transaction": TX},
    ]
    action = interpret("POST", "/v1/sign/batch", body({"requests": items}))
    assert action == SignCalls(
        (
            SigningCall(SigningKind.ETH_MESSAGE, "a", b"one"),
            SigningCall(SigningKind.HASH, "b", b"\xab" * 32),
            SigningCall(SigningKind.ETH_TRANSACTION, "c", TX),
        ),
        (0, 1, 2),
    )


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"requests": [{"type": "hash", "key": "k", "hash": DIGEST}] * 2 + ["x"]}, "requests[2]"),
        ({"requests": [{"type": "hash", "key": "k", "hash": "0x12"}]}, "requests[0].hash"),
        ({"requests": [{"key": "k", "hash": DIGEST}]}, "requests[0].type"),
        ({"requests": [{"type": "hash", "key": "k", "hash": DIGEST, "x": 1}]}, "requests[0].x"),
        ({"requests": []}, "requests"),
        ({"requests": [{"type": "hash", "key": "k", "hash": DIGEST}] * 4}, "requests"),
        ({"requests": {}}, "requests"),
        ({"requests": [], "more": 1}, "more"),
    ],
)
def test_a_malformed_batch_item_fails_the_batch_as_in_the_api(value: Any, field: str) -> None:
    with pytest.raises(InvalidField) as raised:
        interpret("POST", "/v1/sign/batch", body(value), limits=Limits(max_batch=3))
    assert raised.value.field == field


def test_unknown_routes_methods_and_queries_are_refused() -> None:
    for method, target in [
        ("POST", "/v1/sign/bitcoin/psbt"),
        ("GET", "/v1/sign/hash"),
        ("PUT", "/v1/keys"),
        ("POST", "/v1/keys/"),
        ("POST", "/rpc/"),
        ("GET", "/rpc"),
        ("POST", "/healthz"),
        ("GET", "/v1/attestation?nonce=00"),
        ("POST", "/mqtt/"),
        ("post", "/rpc"),
    ]:
        refused(method, target, b"{}")
    assert "query" in refused("POST", "/v1/sign/hash?x=1", body({})).message
    assert "query" in refused("POST", "/rpc?x=1", body({})).message


# JSON-RPC


@pytest.mark.parametrize(
    ("method", "params", "call"),
    [
        ("eth_sign", [ADDRESS, "0x6869"], SigningCall(SigningKind.ETH_MESSAGE, ADDRESS, b"hi")),
        (
            "personal_sign",
            ["0x6869", ADDRESS, "password"],
            SigningCall(SigningKind.ETH_MESSAGE, ADDRESS, b"hi"),
        ),
        (
            "eth_signTypedData_v4",
            [ADDRESS, json.dumps(MAIL)],
            SigningCall(SigningKind.ETH_TYPED_DATA, ADDRESS, MAIL),
        ),
        (
            "eth_signTypedData_v4",
            [ADDRESS, MAIL],
            SigningCall(SigningKind.ETH_TYPED_DATA, ADDRESS, MAIL),
        ),
        ("eth_signTransaction", [TX], SigningCall(SigningKind.ETH_TRANSACTION, ADDRESS, TX)),
        ("eth_sendTransaction", [TX], SigningCall(SigningKind.ETH_TRANSACTION, ADDRESS, TX)),
    ],
)
@pytest.mark.parametrize("path", ["/", "/rpc"])
def test_each_signing_rpc_method_is_one_call(
    path: str, method: str, params: list[Any], call: SigningCall
) -> None:
    assert interpret("POST", path, body(rpc(method, params))) == SignCalls((call,), (0,))


def test_the_transaction_methods_carry_the_transaction_as_sent() -> None:
    sparse = {"from": ADDRESS, "to": OTHER}
    [call] = sign_calls("POST", "/rpc", body(rpc("eth_sendTransaction", [sparse]))).calls
    assert isinstance(call, SigningCall) and call.payload == sparse


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("eth_sign", [ADDRESS], None),
        ("eth_sign", {"address": ADDRESS, "data": "0x00"}, None),
        ("eth_sign", ["0x12", "0x00"], "address"),
        ("eth_sign", [ADDRESS, "hi"], "data"),
        ("personal_sign", ["0x00", ADDRESS, "pw", "extra"], None),
        ("eth_signTypedData_v4", [ADDRESS, "{"], None),
        ("eth_signTypedData_v4", [ADDRESS, []], "data"),
        ("eth_signTypedData_v4", ["nobody", MAIL], "address"),
        ("eth_signTransaction", ["0x00"], "transaction"),
        ("eth_signTransaction", [{"to": OTHER}], "from"),
        ("eth_sendTransaction", [], None),
    ],
)
def test_bad_params_are_the_error_in_the_slot(method: str, params: Any, field: str | None) -> None:
    action = interpret("POST", "/rpc", body(rpc(method, params)))
    assert isinstance(action, SignCalls) and action.origins == (0,)
    [error] = action.calls
    assert isinstance(error, InvalidRequest) and error.field == field


def test_a_batch_keeps_signing_items_in_order_with_their_index() -> None:
    batch = [
        rpc("eth_chainId", []),  # signs nothing
        rpc("eth_sign", [ADDRESS, "0x01"]),
        {"jsonrpc": "1.0", "id": 3, "method": "eth_sign", "params": [ADDRESS, "0x02"]},
        rpc("eth_sign", ["bad", "0x03"]),
        "not a request",
        {"jsonrpc": "2.0", "method": "personal_sign", "params": ["0x04", ADDRESS]},  # notification
        rpc("eth_getBalance", [ADDRESS, "latest"]),  # proxied downstream
        rpc("eth_signTransaction", [TX], request_id="tx"),
    ]
    action = interpret("POST", "/", body(batch))
    assert isinstance(action, SignCalls)
    assert action.origins == (1, 3, 5, 7)
    first, bad, notified, transaction = action.calls
    assert first == SigningCall(SigningKind.ETH_MESSAGE, ADDRESS, b"\x01")
    assert isinstance(bad, InvalidField) and bad.field == "address"
    assert notified == SigningCall(SigningKind.ETH_MESSAGE, ADDRESS, b"\x04")
    assert transaction == SigningCall(SigningKind.ETH_TRANSACTION, ADDRESS, TX)


def test_a_request_that_signs_nothing() -> None:
    assert interpret("POST", "/rpc", body(rpc("eth_chainId", []))) == NoSigning("eth_chainId")
    batch = [rpc("eth_accounts", []), 7, {"jsonrpc": "2.0", "method": "eth_blockNumber"}]
    assert interpret("POST", "/", body(batch)) == NoSigning("eth_accounts,,eth_blockNumber")
    assert interpret("POST", "/rpc", body({"jsonrpc": "2.0"})) == NoSigning("")
    null_params = {"jsonrpc": "2.0", "id": 1, "method": "eth_sign", "params": None}
    assert interpret("POST", "/rpc", body(null_params)) == NoSigning("")  # not JSON-RPC 2.0


def test_a_message_that_is_not_json_rpc_at_all_is_refused() -> None:
    refused("POST", "/rpc", b"{")
    refused("POST", "/rpc", body([]))
    with pytest.raises(InvalidRequest, match="1 to 2"):
        interpret("POST", "/rpc", body([rpc("eth_chainId", [])] * 3), limits=Limits(max_batch=2))


def test_the_signing_methods_are_those_the_rpc_api_signs_with(signer: Signer) -> None:
    service = SigningService(signer, ApiSettings(), ApiMetrics())
    served = set(JsonRpcApi(service, allow_anonymous_for_tests, None).methods)
    assert set(RPC_SIGNING_METHODS) <= served
    assert served - set(RPC_SIGNING_METHODS) == {
        "eth_accounts",
        "eth_requestAccounts",
        "eth_chainId",
    }


# MQTT


def test_an_mqtt_message_is_one_call_its_envelope_aside() -> None:
    message = {
        "id": "tx-42",
        "reply_to": "signd/replies/device-7/tx",
        "auth": {"authorization": "Bearer t"},
        "type": "ethereum/transaction",
        "key": "k",
        "transaction": TX,
    }
    action = interpret("POST", "/mqtt/signd/requests/device-7", body(message))
    call = SigningCall(SigningKind.ETH_TRANSACTION, "k", TX)
    assert action == SignCalls((call,), (0,))
    # the adapter derives the same call from the same payload
    incoming = Incoming("signd/requests/device-7", body(message))
    request, _ = read_envelope(incoming, ApiSettings(), ReplyTo(None))
    assert parse_mqtt_request(request) == call
    # a topic is taken whole, '?' included
    assert interpret("POST", "/mqtt/a?b", body(message)) == action


def test_an_mqtt_message_names_the_wrong_field() -> None:
    message = {"id": 1, "type": "hash", "key": "k", "hash": DIGEST, "extra": True}
    assert refused("POST", "/mqtt/t", body(message)).field == "extra"
    assert refused("POST", "/mqtt/t", body({"id": 1, "key": "k"})).field == "type"
    assert "payload must be a JSON object" in refused("POST", "/mqtt/t", b"[1]").message
    refused("GET", "/mqtt/t", body(message))


# fills


def test_fills_add_what_the_caller_left_out() -> None:
    sparse = {"from": ADDRESS, "to": OTHER, "value": "0x1", "nonce": None}
    fills = {
        "nonce": "0x5",
        "gas": "0x5208",
        "maxFeePerGas": "0x10",
        "maxPriorityFeePerGas": "0x1",
        "chainId": "0x1",
        "type": "0x2",
    }
    filled = apply_fills(sparse, fills)
    assert filled == {**sparse, **fills}
    assert sparse["nonce"] is None  # not changed in place
    assert apply_fills(sparse, {}) == sparse
    assert apply_fills({"from": ADDRESS}, {"gasPrice": "0x1"})["gasPrice"] == "0x1"


@pytest.mark.parametrize(
    ("transaction", "fills", "field"),
    [
        (TX, {"nonce": "0x9"}, "nonce"),
        (TX, {"gas": "0x1"}, "gas"),
        ({"from": ADDRESS, "gasLimit": "0x5208"}, {"gas": "0x1"}, "gas"),
        ({"from": ADDRESS, "type": "0x0"}, {"type": "0x2"}, "type"),
        ({"from": ADDRESS}, {"to": OTHER}, "to"),
        ({"from": ADDRESS}, {"value": "0x1"}, "value"),
        ({"from": ADDRESS}, {"data": "0x00"}, "data"),
        ({"from": ADDRESS}, {"from": OTHER}, "from"),
        ({"from": ADDRESS}, {"accessList": []}, "accessList"),
        ({"from": ADDRESS}, {"gasLimit": "0x1"}, "gasLimit"),
        ({"from": ADDRESS}, {"nonce": None}, "nonce"),
    ],
)
def test_fills_refuse_what_the_caller_gave_or_may_not_be_filled(
    transaction: dict[str, Any], fills: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        apply_fills(transaction, fills)
    assert raised.value.field == field


def test_fillable_is_what_the_downstream_node_fills(make_proxy: Any) -> None:
    """What the host signs for eth_sendTransaction is the authenticated transaction with
    fills that apply_fills accepts."""
    gate, client = make_proxy
    sent = {"from": ADDRESS, "to": OTHER, "value": "0x1"}
    client.post("/rpc", json=rpc("eth_sendTransaction", [sent]))
    [host_call] = gate.calls
    [call] = sign_calls("POST", "/rpc", body(rpc("eth_sendTransaction", [sent]))).calls
    assert isinstance(call, SigningCall)
    fills = {k: v for k, v in host_call.payload.items() if k not in sent}
    assert set(fills) <= FILLABLE and {"nonce", "gas", "chainId"} <= set(fills)
    assert apply_fills(call.payload, fills) == host_call.payload


# the host derives the same calls (property)


class RecordingGate:
    """A gate that records what the API asks of it and refuses every signature."""

    def __init__(self) -> None:
        self.calls: list[SigningCall] = []
        self.reads: list[CreateKeys | ReadKeys] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        self.calls.clear()
        self.reads.clear()

    def create_keys(
        self, principal: Principal, *, chain: str, custody: str, count: int, labels: Sequence[str]
    ) -> list[KeyInfo]:
        self.reads.append(CreateKeys(chain, custody, count, tuple(labels)))
        return []

    def get_key(self, principal: Principal, ref: str) -> KeyInfo:
        self.reads.append(ReadKeys(ref, None, None, None, None, 1))
        raise KeyNotFound("recorded")

    def list_keys(
        self,
        principal: Principal,
        *,
        custody: str,
        chain: str | None,
        label: str | None,
        cursor: str | None,
        limit: int,
    ) -> KeyPage:
        self.reads.append(ReadKeys(None, chain, label, custody, cursor, limit))
        return KeyPage([], None)

    def performed(self, principal: Principal, call: SigningCall) -> Signed | Exception | None:
        return None

    async def sign_async(
        self, principal: Principal, calls: Sequence[SigningCall], run: Any
    ) -> list[Signed | Exception]:
        return self.sign(principal, calls)

    async def sign_each_async(
        self, requests: Sequence[tuple[Principal, Sequence[SigningCall]]], run: Any
    ) -> list[list[Signed | Exception] | Exception]:
        return [self.sign(principal, calls) for principal, calls in requests]

    def health_checks(self) -> list[tuple[str, Any]]:
        return []

    def reload_status(self) -> None:
        return None

    def sign(self, principal: Principal, calls: Sequence[SigningCall]) -> list[Signed | Exception]:
        with self._lock:
            self.calls.extend(calls)
        return [AccessDenied("recorded") for _ in calls]


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[Signer]:
    with open_signer(make_home(tmp_path / "home")) as opened:
        yield opened


@pytest.fixture
def host(signer: Signer) -> Iterator[tuple[RecordingGate, TestClient]]:
    gate = RecordingGate()
    app = create_app(
        signer,
        ApiSettings(allow_blind_signing=True, max_batch=8),
        authenticate=allow_anonymous_for_tests,
        gate=gate,
    )
    with TestClient(app) as client:
        yield gate, client


@pytest.fixture
def make_proxy(signer: Signer) -> Iterator[tuple[RecordingGate, TestClient]]:
    def node(request: httpx.Request) -> httpx.Response:
        call = json.loads(request.content)
        answers = {
            "eth_chainId": "0x7a69",
            "eth_getTransactionCount": "0x5",
            "eth_getBlockByNumber": {"baseFeePerGas": "0x7"},
            "eth_maxPriorityFeePerGas": "0x2",
            "eth_estimateGas": "0x5208",
        }
        return httpx.Response(
            200, json={"jsonrpc": "2.0", "id": call["id"], "result": answers[call["method"]]}
        )

    gate = RecordingGate()
    app = create_app(
        signer,
        ApiSettings(downstream="http://127.0.0.1:1/"),
        authenticate=allow_anonymous_for_tests,
        gate=gate,
        downstream_transport=httpx.MockTransport(node),
    )
    with TestClient(app) as client:
        yield gate, client


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
addresses = st.sampled_from([ADDRESS, OTHER, ADDRESS.lower(), "0X" + "Ab" * 20])
hex_data = st.binary(max_size=40).map(lambda data: "0x" + data.hex())
keys = st.one_of(addresses, st.text(min_size=1, max_size=12))


def once_in(odds: int) -> st.SearchStrategy[bool]:
    """True about once in ``odds`` draws (integers would favour their bounds)."""
    return st.sampled_from([False] * (odds - 1) + [True])


def maybe(valid: st.SearchStrategy[Any], odds: int = 8) -> st.SearchStrategy[Any]:
    """``valid``, or once in ``odds`` any JSON value."""
    return once_in(odds).flatmap(lambda junk: json_values if junk else valid)


messages = st.one_of(st.text(max_size=20), hex_data.map(lambda value: {"hex": value}))
transactions = st.builds(lambda extra, sender: {**extra, "from": sender}, json_objects, addresses)
payload_fields: dict[SigningKind, tuple[str, st.SearchStrategy[Any]]] = {
    SigningKind.HASH: ("hash", st.binary(min_size=32, max_size=32).map(lambda d: "0x" + d.hex())),
    SigningKind.ETH_TRANSACTION: ("transaction", json_objects),
    SigningKind.ETH_MESSAGE: ("message", messages),
    SigningKind.ETH_TYPED_DATA: ("typed_data", st.one_of(json_objects, st.just(MAIL))),
}


@st.composite
def signing_bodies(draw: st.DrawFn, kind: SigningKind, odds: int = 8) -> dict[str, Any]:
    """Mostly valid bodies: a field is junk, unknown or missing once in ``odds``."""
    name, values = payload_fields[kind]
    fields = {"key": draw(maybe(keys, odds)), name: draw(maybe(values, odds))}
    if draw(once_in(2 * odds)):
        fields[draw(st.sampled_from(["note", "key", name]))] = draw(json_values)
    if draw(once_in(2 * odds)):
        del fields[draw(st.sampled_from(["key", name]))]
    return fields


@st.composite
def batch_items(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(list(SigningKind)))
    return {"type": kind.value, **draw(signing_bodies(kind, odds=40))}


URL_CHARACTERS = st.characters(exclude_categories=("Cs",))
"""Any character a URL can carry once UTF-8 encoded (lone surrogates cannot be)."""


@st.composite
def rest_requests(draw: st.DrawFn) -> tuple[str, str, Any]:
    route = draw(st.sampled_from(["sign", "batch", "create", "list", "get"]))
    if route == "sign":
        kind = draw(st.sampled_from(list(SigningKind)))
        return "POST", f"/v1/sign/{kind.value}", draw(signing_bodies(kind))
    if route == "batch":
        items = draw(st.lists(maybe(batch_items(), odds=40), min_size=1, max_size=6))
        return "POST", "/v1/sign/batch", {"requests": items}
    if route == "create":
        fields = {
            "chain": draw(maybe(st.sampled_from(["ethereum", "bitcoin"]))),
            "custody": draw(maybe(st.just("keystore"))),
        }
        if draw(st.booleans()):
            fields["count"] = draw(maybe(st.integers(1, 1000)))
        if draw(st.booleans()):
            fields["labels"] = draw(maybe(st.lists(st.text(max_size=5), max_size=3)))
        return "POST", "/v1/keys", fields
    if route == "list":
        names = st.sampled_from(["custody", "chain", "label", "cursor", "limit"])
        # No lone surrogates: a URL is UTF-8, and they have no UTF-8 form.
        values = st.one_of(st.text(URL_CHARACTERS, max_size=5), st.integers(1, 1000).map(str))
        pairs = draw(st.dictionaries(names, values, max_size=4))
        query = str(httpx.QueryParams(pairs))
        return "GET", "/v1/keys" + (f"?{query}" if query else ""), None
    key = draw(  # not "/" (Starlette answers 404, interpret InvalidRequest), no dot segments
        st.text(
            st.characters(exclude_characters="/", exclude_categories=("Cs",)),
            min_size=1,
            max_size=12,
        ).filter(lambda text: text not in (".", ".."))
    )
    return "GET", f"/v1/keys/{quote(key, safe='')}", None


@st.composite
def rpc_items(draw: st.DrawFn, index: int) -> dict[str, Any]:
    # not eth_sendTransaction: without a node the host refuses it (see the fills test)
    signing = sorted(RPC_SIGNING_METHODS.keys() - {"eth_sendTransaction"})
    method = draw(st.sampled_from([*signing, "eth_chainId", "web3_clientVersion"]))
    address, data = draw(addresses), draw(hex_data)
    params: Any = {
        "eth_sign": [address, data],
        "personal_sign": [data, address, *draw(st.lists(st.text(max_size=4), max_size=1))],
        "eth_signTypedData_v4": [
            address,
            draw(st.one_of(st.just(MAIL), st.just(json.dumps(MAIL)), json_objects)),
        ],
        "eth_signTransaction": [draw(transactions)],
    }.get(method, [])
    return rpc(method, draw(maybe(st.just(params))), request_id=index)


@st.composite
def rpc_messages(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(rpc_items(0))
    size = draw(st.integers(1, 5))
    return [draw(rpc_items(index)) for index in range(size)]


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@PROPERTY
@given(request=rest_requests())
def test_rest_the_host_asks_the_gate_for_what_interpret_derives(
    host: tuple[RecordingGate, TestClient], request: tuple[str, str, Any]
) -> None:
    gate, client = host
    gate.clear()
    method, target, value = request
    data = b"" if value is None else body(value)
    response = client.request(method, target, content=data)
    try:
        action = interpret(method, target, data, limits=Limits(max_batch=8))
    except SigndError as exc:
        assert (gate.calls, gate.reads) == ([], [])
        wire = wire_error(exc)
        assert (response.status_code, response.json()) == (wire.http_status, {"error": wire.body})
        return
    if isinstance(action, SignCalls):
        assert (gate.calls, gate.reads) == (list(action.calls), [])
    else:
        assert (gate.calls, gate.reads) == ([], [action])


@PROPERTY
@given(message=rpc_messages())
def test_json_rpc_the_host_signs_what_interpret_derives(
    host: tuple[RecordingGate, TestClient], message: Any
) -> None:
    gate, client = host
    gate.clear()
    data = body(message)
    answers = client.post("/rpc", content=data).json()
    action = interpret("POST", "/rpc", data)
    if isinstance(action, NoSigning):
        assert gate.calls == []
        return
    assert isinstance(action, SignCalls)
    assert gate.calls == [call for call in action.calls if isinstance(call, SigningCall)]
    by_id = {
        answer["id"]: answer for answer in (answers if isinstance(answers, list) else [answers])
    }
    for origin, call in zip(action.origins, action.calls, strict=True):
        item = message if isinstance(message, dict) else message[origin]
        assert item["method"] in RPC_SIGNING_METHODS
        if isinstance(call, SigndError):
            assert by_id[origin]["error"] == wire_error(call).rpc_error()
