"""Ethereum JSON-RPC in-process: signd's own methods, the JSON-RPC error codes, and proxy mode
against a fake node (an httpx mock transport)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_utils import keccak
from starlette.requests import Request
from starlette.testclient import TestClient

from signd.api import ApiSettings, Principal
from signd.api.inputs import read_body
from signd.api.rpc import BATCH_CONCURRENCY, SenderTurns
from signd.api.service import UngatedSigner
from signd.chains.ethereum import decode_transaction
from signd.errors import DependencyUnavailable
from signd.operations import Signer
from tests.api import samples
from tests.api.conftest import ClientFactory
from tests.api.samples import MAIL

NODE_URL = "http://127.0.0.1:1/v3/secret-api-key"
CHAIN_ID = 31337
SLOW_NODE_CALL = 0.4
"""Seconds each call to the slow node takes: a send makes several."""
SLOW_NODE_TIMEOUT = 1.0
BASE_FEE = 7 * 10**9
PRIORITY = 2 * 10**9
GAS_PRICE = 11 * 10**9
SOMEONE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def rpc(client: TestClient, method: str, *params: Any, path: str = "/rpc") -> dict[str, Any]:
    response = client.post(
        path, json={"jsonrpc": "2.0", "id": 7, "method": method, "params": list(params)}
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["jsonrpc"] == "2.0" and answer["id"] == 7
    return answer


def result(client: TestClient, method: str, *params: Any) -> Any:
    answer = rpc(client, method, *params)
    assert "error" not in answer, answer
    return answer["result"]


def error(client: TestClient, method: str, *params: Any) -> dict[str, Any]:
    answer = rpc(client, method, *params)
    assert "result" not in answer, answer
    value: dict[str, Any] = answer["error"]
    return value


@pytest.fixture
def address(client: TestClient) -> str:
    keys = client.post("/v1/keys", json={"chain": "ethereum", "custody": "keystore", "count": 2})
    value: str = keys.json()["keys"][0]["address"]
    return value


# signd's own methods


def test_eth_accounts_lists_ethereum_keys(client: TestClient, address: str) -> None:
    accounts = result(client, "eth_accounts")
    assert len(accounts) == 2 and address in accounts
    assert result(client, "eth_requestAccounts") == accounts


def test_eth_accounts_by_configuration(make_client: ClientFactory) -> None:
    client = make_client()
    created = client.post(
        "/v1/keys", json={"chain": "ethereum", "custody": "keystore", "count": 3}
    ).json()["keys"]
    client.post("/v1/keys", json={"chain": "ethereum", "custody": "keystore", "labels": ["rpc"]})
    listed = make_client(ApiSettings(accounts=(created[2]["key_id"], created[0]["address"])))
    assert result(listed, "eth_accounts") == [created[2]["address"], created[0]["address"]]
    labelled = make_client(ApiSettings(accounts_label="rpc"))
    assert len(result(labelled, "eth_accounts")) == 1
    capped = make_client(ApiSettings(max_accounts=2))
    assert result(capped, "eth_accounts") == [created[0]["address"], created[1]["address"]]


def test_eth_chain_id_from_configuration_or_unsupported(make_client: ClientFactory) -> None:
    assert result(make_client(ApiSettings(chain_id=5)), "eth_chainId") == "0x5"
    failure = error(make_client(), "eth_chainId")
    assert failure["data"]["code"] == "unsupported_operation"


def test_eth_sign_and_personal_sign_are_eip191_over_the_bytes(
    client: TestClient, address: str
) -> None:
    data = "0x" + b"hello \x00 bytes".hex()
    signature = result(client, "eth_sign", address, data)
    assert samples.bytes_signer(b"hello \x00 bytes", signature) == address
    assert result(client, "personal_sign", data, address) == signature
    assert result(client, "personal_sign", data, address.lower(), "ignored password") == signature


def test_eth_sign_transaction_takes_data_and_input_when_equal(
    client: TestClient, address: str
) -> None:
    """As geth: both fields given with the same bytes sign as one; different ones refused."""
    tx = {**samples.transaction(chain_id=CHAIN_ID), "from": address, "data": "0xab12"}
    alone = result(client, "eth_signTransaction", tx)
    both = result(client, "eth_signTransaction", {**tx, "input": "0xAB12"})
    assert both["raw"] == alone["raw"] and both["tx"]["input"] == "0xab12"
    differing = error(client, "eth_signTransaction", {**tx, "input": "0xab13"})
    assert differing["data"] == {"code": "invalid_field", "field": "input"}


def test_eth_sign_typed_data_v4_takes_json_text_or_an_object(
    client: TestClient, address: str
) -> None:
    as_text = result(client, "eth_signTypedData_v4", address, json.dumps(samples.MAIL))
    as_object = result(client, "eth_signTypedData_v4", address, samples.MAIL)
    assert as_text == as_object
    assert samples.typed_data_signer(samples.MAIL, as_text) == address


def test_eth_sign_typed_data_v4_refuses_a_message_beside_primary_type_eip712_domain(
    client: TestClient, address: str
) -> None:
    document = {**samples.MAIL, "primaryType": "EIP712Domain"}
    failure = error(client, "eth_signTypedData_v4", address, document)
    assert failure["data"] == {"code": "invalid_typed_data", "field": "message"}


def test_eth_sign_transaction_answers_like_geth(client: TestClient, address: str) -> None:
    tx = {**samples.transaction(chain_id=CHAIN_ID), "from": address}
    answer = result(client, "eth_signTransaction", tx)
    assert set(answer) == {"raw", "tx"}
    assert samples.transaction_signer(answer["raw"]) == address
    fields = answer["tx"]
    assert fields["hash"] == "0x" + keccak(hexstr=answer["raw"]).hex()
    assert fields["input"] == "0x" and fields["nonce"] == "0x0" and fields["type"] == "0x2"
    assert {"v", "r", "s", "yParity", "chainId", "maxFeePerGas"} <= set(fields)
    missing = {key: value for key, value in tx.items() if key != "nonce"}
    assert error(client, "eth_signTransaction", missing)["data"] == {
        "code": "invalid_field",
        "field": "nonce",
    }


def test_a_chain_id_above_eip_2294_is_invalid_params(client: TestClient, address: str) -> None:
    """The probe's legacy transaction for chain 2**256-1 (whose v would not fit in 256 bits)
    gets a JSON-RPC error naming the field, not a signature."""
    tx = {
        "from": address,
        "chainId": hex(2**256 - 1),
        "nonce": "0x0",
        "gasPrice": hex(GAS_PRICE),
        "gas": hex(21000),
        "to": "0x" + "35" * 20,
    }
    failure = error(client, "eth_signTransaction", tx)
    assert failure["code"] == -32602
    assert failure["data"] == {"code": "invalid_field", "field": "chainId"}


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("eth_sign", ["0x1234", "0x00"], "address"),
        ("eth_sign", ["0x" + "00" * 20, "not hex"], "data"),
        ("eth_signTypedData_v4", ["0x" + "00" * 20, "{not json"], None),
        ("eth_signTypedData_v4", ["0x" + "00" * 20, [1]], "data"),
        ("eth_signTransaction", [{"to": "0x" + "00" * 20}], "from"),
    ],
)
def test_bad_params_are_invalid_params(
    client: TestClient, method: str, params: list[Any], field: str | None
) -> None:
    failure = error(client, method, *params)
    assert failure["code"] == -32602
    assert failure["data"].get("field") == field


def test_wrong_arity_is_invalid_params(client: TestClient) -> None:
    assert error(client, "eth_sign", "0x" + "00" * 20)["code"] == -32602
    assert error(client, "eth_accounts", 1)["code"] == -32602


def test_a_key_signd_does_not_hold_is_a_server_error_with_data(client: TestClient) -> None:
    failure = error(client, "personal_sign", "0x00", "0x" + "ab" * 20)
    assert failure["code"] == -32001
    assert failure["data"] == {"code": "key_not_found"}


# JSON-RPC 2.0 framing


def test_parse_error_invalid_request_and_method_not_found(client: TestClient) -> None:
    parsed = client.post("/rpc", content=b"{oops")
    assert parsed.status_code == 200
    assert parsed.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "parse error: the request body is not valid JSON"},
    }
    overflowing = client.post("/rpc", content=b'{"jsonrpc": "2.0", "id": 1e400, "method": "x"}')
    assert overflowing.status_code == 200  # was a 500, after signing, with an infinite id
    assert overflowing.json()["error"] == {
        "code": -32700,
        "message": "parse error: the number 1e400 is out of range",
    }
    for bad in (
        {"jsonrpc": "1.0", "id": 1, "method": "eth_accounts"},
        {"id": 1},
        5,
        {"jsonrpc": "2.0", "id": [1], "method": "x"},
    ):
        answer = client.post("/", json=bad).json()
        assert answer["error"]["code"] == -32600
    assert (
        client.post(
            "/", json={"jsonrpc": "2.0", "id": 1, "method": "eth_accounts", "params": 3}
        ).json()["error"]["code"]
        == -32600
    )
    assert error(client, "eth_blockNumber")["code"] == -32601
    no_node = error(client, "eth_sendTransaction", {})
    assert no_node["code"] == -32601 and "--downstream" in no_node["message"]


def test_batches_answer_in_order_and_skip_notifications(client: TestClient, address: str) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "eth_accounts"},
        {"jsonrpc": "2.0", "method": "eth_accounts"},
        {"jsonrpc": "2.0", "id": 2, "method": "nope"},
        {"jsonrpc": "2.0", "id": 3, "method": "personal_sign", "params": ["0x61", address]},
        17,
    ]
    answers = client.post("/rpc", json=batch).json()
    assert [answer["id"] for answer in answers] == ["a", 2, 3, None]
    assert address in answers[0]["result"]
    assert answers[1]["error"]["code"] == -32601
    assert samples.bytes_signer(b"a", answers[2]["result"]) == address
    assert answers[3]["error"]["code"] == -32600
    assert client.post("/rpc", json=[]).json()["error"]["code"] == -32600
    only_notifications = client.post("/rpc", json=[{"jsonrpc": "2.0", "method": "eth_accounts"}])
    assert only_notifications.status_code == 204 and only_notifications.content == b""


def test_a_batch_signs_its_messages_together_and_answers_each_in_its_place(
    client: TestClient, address: str
) -> None:
    """A batch that signs only messages signs those whose params read in one gate call; a
    member whose params do not read, a notification and other methods are answered as
    alone."""
    nobody = "0x" + "00" * 20  # no key has this address
    batch = [
        {"jsonrpc": "2.0", "id": 0, "method": "personal_sign", "params": ["0x61", address]},
        {"jsonrpc": "2.0", "id": 1, "method": "personal_sign", "params": ["zz", address]},
        {"jsonrpc": "2.0", "id": 2, "method": "eth_signTypedData_v4", "params": [address, MAIL]},
        {"jsonrpc": "2.0", "method": "personal_sign", "params": ["0x62", address]},
        {"jsonrpc": "2.0", "id": 4, "method": "eth_accounts"},
        {"jsonrpc": "2.0", "id": 5, "method": "eth_sign", "params": [address, "0x63"]},
        {"jsonrpc": "2.0", "id": 6, "method": "personal_sign", "params": ["0x64", nobody]},
    ]
    answers = client.post("/rpc", json=batch).json()
    assert [answer["id"] for answer in answers] == [0, 1, 2, 4, 5, 6]
    assert samples.bytes_signer(b"a", answers[0]["result"]) == address
    assert answers[1]["error"]["code"] == -32602
    assert samples.typed_data_signer(MAIL, answers[2]["result"]) == address
    assert address in answers[3]["result"]
    assert samples.bytes_signer(b"c", answers[4]["result"]) == address
    assert answers[5]["error"]["data"]["code"] == "key_not_found"


async def enclave_down(request: Request) -> Principal:
    """An authenticator that reads the request, then finds its gate unavailable."""
    await read_body(request, 1 << 20, 5.0)
    raise DependencyUnavailable("the enclave did not answer within 3 s")


def test_a_batch_whose_gate_is_unavailable_gets_an_error_for_each_member(
    make_client: ClientFactory, signer: Signer
) -> None:
    """A valid batch refused by a dependency while it is authenticated (the gate that would
    also sign its messages) is answered as a batch: an array, each member with an id given
    -32006 with the error's message and data, an invalid member -32600, a notification
    nothing (HTTP 200: a JSON-RPC request was read). One error object with a null id would
    leave a batching client (ethers.js) without an answer for any of its requests."""
    client = make_client(authenticate=enclave_down, gate=UngatedSigner(signer))
    batch: list[Any] = [
        {"jsonrpc": "2.0", "id": 1, "method": "personal_sign", "params": ["0x61", SOMEONE]},
        {"jsonrpc": "2.0", "method": "personal_sign", "params": ["0x62", SOMEONE]},
        {"jsonrpc": "2.0", "id": "two", "method": "eth_accounts"},
        17,
        {"jsonrpc": "2.0", "id": None, "method": "eth_chainId"},
    ]
    response = client.post("/rpc", json=batch)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [answer["id"] for answer in answers] == [1, "two", None, None]
    unavailable = {
        "code": -32006,
        "message": "the enclave did not answer within 3 s",
        "data": {"code": "dependency_unavailable"},
    }
    assert [answer.get("error") for answer in answers] == [
        unavailable,
        unavailable,
        {"code": -32600, "message": "invalid JSON-RPC 2.0 request"},
        unavailable,
    ]
    assert all("result" not in answer for answer in answers)
    notifications = [{"jsonrpc": "2.0", "method": "eth_accounts"}] * 2
    only_notifications = client.post("/rpc", json=notifications)
    assert only_notifications.status_code == 204 and only_notifications.content == b""


@pytest.mark.parametrize("request_id", [1, "one", 2.5, None])
def test_a_single_request_whose_gate_is_unavailable_keeps_its_id(
    make_client: ClientFactory, signer: Signer, request_id: object
) -> None:
    """A single request keeps the refusal's HTTP status (503) and gets its error with its
    own id; it used to get ``"id": null``, as though no request had been read."""
    client = make_client(authenticate=enclave_down, gate=UngatedSigner(signer))
    call = {"jsonrpc": "2.0", "id": request_id, "method": "eth_accounts"}
    response = client.post("/rpc", json=call)
    assert response.status_code == 503, response.text
    assert response.json() == {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": -32006,
            "message": "the enclave did not answer within 3 s",
            "data": {"code": "dependency_unavailable"},
        },
    }


def test_a_request_whose_gate_is_unavailable_is_refused_as_a_whole(
    make_client: ClientFactory, signer: Signer
) -> None:
    """A notification, something that is no request, or a batch that is not one (empty,
    too large, not JSON), keeps the refusal's HTTP status and one error object with a null
    id."""
    client = make_client(
        ApiSettings(max_batch=2), authenticate=enclave_down, gate=UngatedSigner(signer)
    )
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"}
    notification = {"jsonrpc": "2.0", "method": "eth_accounts"}
    not_a_request = {"jsonrpc": "1.0", "id": 1, "method": "eth_accounts"}
    bodies = (json.dumps(notification), json.dumps(not_a_request), "17", "[]", "[{")
    for body in (*bodies, json.dumps([call] * 3)):
        response = client.post("/rpc", content=body)
        assert response.status_code == 503, (body, response.text)
        answer = response.json()
        assert answer["id"] is None and answer["error"]["code"] == -32006, (body, answer)


def test_requests_stopped_at_shutdown_are_answered_as_the_requests_they_are(
    make_client: ClientFactory, signer: Signer
) -> None:
    """Requests stopped at shutdown while the enclave authenticated them: a single request
    gets 503 with its error and its id, a batch an array, that error for each member with
    an id (HTTP 200). Both got one error object with a null id."""
    authenticating = threading.Event()

    async def enclave_stuck(request: Request) -> Principal:
        await read_body(request, 1 << 20, 5.0)
        authenticating.set()
        await asyncio.Event().wait()  # till stopped
        raise AssertionError("never set")

    client = make_client(authenticate=enclave_stuck, gate=UngatedSigner(signer))
    requests = client.app.state.requests  # type: ignore[attr-defined]

    def stopped(body: Any) -> httpx.Response:
        authenticating.clear()
        answers: list[httpx.Response] = []
        answering = threading.Thread(target=lambda: answers.append(client.post("/rpc", json=body)))
        answering.start()
        assert authenticating.wait(10)
        assert client.portal is not None
        assert client.portal.call(requests.stop_all) == 1
        answering.join(10)
        [answer] = answers
        return answer

    single = stopped({"jsonrpc": "2.0", "id": "s", "method": "eth_accounts"})
    assert single.status_code == 503, single.text
    assert single.json()["id"] == "s" and single.json()["error"]["code"] == -32006
    assert "shutting down" in single.json()["error"]["message"]
    batch = stopped(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"},
            {"jsonrpc": "2.0", "method": "eth_accounts"},
            {"jsonrpc": "2.0", "id": "b", "method": "eth_chainId"},
        ]
    )
    assert batch.status_code == 200, batch.text
    assert [answer["id"] for answer in batch.json()] == [1, "b"]
    assert all(answer["error"]["code"] == -32006 for answer in batch.json())
    assert all("shutting down" in answer["error"]["message"] for answer in batch.json())


def test_batch_size_is_bounded(make_client: ClientFactory) -> None:
    client = make_client(ApiSettings(max_batch=2))
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"}
    assert client.post("/rpc", json=[call] * 3).json()["error"]["code"] == -32600


def test_oversized_rpc_body_is_413_in_json_rpc_shape(make_client: ClientFactory) -> None:
    client = make_client(ApiSettings(max_body_bytes=100))
    response = client.post("/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "x" * 200})
    assert response.status_code == 413
    assert response.json()["id"] is None
    assert response.json()["error"]["code"] == -32600  # no request was read: not its params
    assert response.json()["error"]["data"]["code"] == "payload_too_large"


# proxy mode against a fake node


class FakeNode:
    """Answers the calls signd makes while filling and submitting, and records them."""

    def __init__(self, *, london: bool = True, priority_method: bool = True) -> None:
        self.london = london
        self.priority_method = priority_method
        self.calls: list[dict[str, Any]] = []
        self.sent: list[str] = []
        self.paths: set[str] = set()

    def answer(self, method: str, params: list[Any]) -> Any:
        if method == "eth_chainId":
            return hex(CHAIN_ID)
        if method == "eth_getTransactionCount":
            return "0x5"
        if method == "eth_getBlockByNumber":
            return {"number": "0x10", **({"baseFeePerGas": hex(BASE_FEE)} if self.london else {})}
        if method == "eth_maxPriorityFeePerGas" and self.priority_method:
            return hex(PRIORITY)
        if method == "eth_feeHistory":
            return {"reward": [[hex(PRIORITY)], [hex(PRIORITY + 2)], [hex(PRIORITY - 2)]]}
        if method == "eth_gasPrice":
            return hex(GAS_PRICE)
        if method == "eth_estimateGas":
            assert not {"nonce", "maxFeePerGas", "gasPrice"} & set(params[0])
            return hex(21_000)
        if method == "eth_sendRawTransaction":
            self.sent.append(params[0])
            return "0x" + Account.recover_transaction(params[0]).lower()[2:].rjust(64, "0")
        if method == "eth_blockNumber":
            return "0x10"
        raise LookupError(method)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.add(request.url.path)
        call = json.loads(request.content)
        self.calls.append(call)
        try:
            value = self.answer(call["method"], call.get("params", []))
        except LookupError:
            return httpx.Response(
                200,
                json={
                    "jsonrpc": "2.0",
                    "id": call["id"],
                    "error": {"code": -32601, "message": "no such method"},
                },
            )
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": call["id"], "result": value})

    def methods(self) -> list[str]:
        return [call["method"] for call in self.calls]


def proxy_client(make_client: ClientFactory, node: Any) -> TestClient:
    handler = httpx.MockTransport(node)
    return make_client(ApiSettings(downstream=NODE_URL), downstream_transport=handler)


def decoded(raw: str) -> dict[str, Any]:
    """The fields of a signed transaction, quantities as integers."""
    fields = decode_transaction(bytes.fromhex(raw[2:])).to_dict(decoded=True)["transaction"]
    return {
        key: int(value, 16) if isinstance(value, str) and key not in ("to", "data") else value
        for key, value in fields.items()
    }


def test_send_transaction_fills_an_eip1559_transaction_from_the_node(
    make_client: ClientFactory, address: str
) -> None:
    node = FakeNode()
    client = proxy_client(make_client, node)
    to = "0x" + "35" * 20
    tx_hash = result(client, "eth_sendTransaction", {"from": address, "to": to, "value": "0x1"})
    assert len(node.sent) == 1
    assert tx_hash == "0x" + address.lower()[2:].rjust(64, "0")
    raw = node.sent[0]
    assert samples.transaction_signer(raw) == address
    fields = decoded(raw)
    assert fields["type"] == 2
    assert fields["chainId"] == CHAIN_ID and fields["nonce"] == 5 and fields["gas"] == 21_000
    assert fields["maxPriorityFeePerGas"] == PRIORITY
    assert fields["maxFeePerGas"] == 2 * BASE_FEE + PRIORITY
    assert "eth_sendRawTransaction" in node.methods()
    assert node.paths == {"/v3/secret-api-key"}


def test_send_transaction_legacy_when_asked_or_before_london(
    make_client: ClientFactory, address: str
) -> None:
    node = FakeNode()
    client = proxy_client(make_client, node)
    result(client, "eth_sendTransaction", {"from": address, "to": "0x" + "35" * 20, "type": "0x0"})
    old_node = FakeNode(london=False)
    old = proxy_client(make_client, old_node)
    result(old, "eth_sendTransaction", {"from": address, "to": "0x" + "35" * 20})
    for raw in (node.sent[0], old_node.sent[0]):
        fields = decoded(raw)
        assert fields["type"] == 0 and fields["gasPrice"] == GAS_PRICE
        assert samples.transaction_signer(raw) == address


def test_send_transaction_keeps_what_the_caller_gave(
    make_client: ClientFactory, address: str
) -> None:
    node = FakeNode(priority_method=False)
    client = proxy_client(make_client, node)
    tx = {
        "from": address,
        "to": "0x" + "35" * 20,
        "nonce": "0x9",
        "gas": "0x7530",
        "maxFeePerGas": hex(10**9),
    }
    result(client, "eth_sendTransaction", tx)
    fields = decoded(node.sent[0])
    assert (fields["nonce"], fields["gas"], fields["maxFeePerGas"]) == (9, 30_000, 10**9)
    assert fields["maxPriorityFeePerGas"] == 10**9  # the node's median reward, capped by the fee
    assert "eth_feeHistory" in node.methods()
    assert (
        "eth_getTransactionCount" not in node.methods() and "eth_estimateGas" not in node.methods()
    )


def test_send_transaction_refuses_another_chain(make_client: ClientFactory, address: str) -> None:
    node = FakeNode()
    client = proxy_client(make_client, node)
    failure = error(
        client, "eth_sendTransaction", {"from": address, "to": address, "chainId": "0x1"}
    )
    assert failure["data"] == {"code": "invalid_field", "field": "chainId"}
    assert node.sent == []


def test_sign_transaction_is_filled_too_but_not_sent(
    make_client: ClientFactory, address: str
) -> None:
    node = FakeNode()
    client = proxy_client(make_client, node)
    answer = result(client, "eth_signTransaction", {"from": address, "to": address})
    assert samples.transaction_signer(answer["raw"]) == address
    assert answer["tx"]["chainId"] == hex(CHAIN_ID) and node.sent == []


def test_other_methods_are_forwarded_but_never_signing_ones(
    make_client: ClientFactory, address: str
) -> None:
    node = FakeNode()
    client = proxy_client(make_client, node)
    assert result(client, "eth_blockNumber") == "0x10"
    assert result(client, "eth_chainId") == hex(CHAIN_ID)
    downstream_error = error(client, "net_peerCount")
    assert downstream_error == {"code": -32601, "message": "no such method"}
    for method in (
        "eth_signTypedData_v3",
        "personal_unlockAccount",
        "personal_sendTransaction",
        "eth_signTypedData",
    ):
        assert error(client, method, address)["code"] == -32601
    forwarded = node.methods()
    assert "net_peerCount" in forwarded
    assert not any(name.startswith(("personal_", "eth_sign")) for name in forwarded)


class CrowdedNode(FakeNode):
    """A node that answers each call after a short wait, counting the calls in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            return await super().__call__(request)
        finally:
            self.in_flight -= 1


def test_a_batch_is_answered_together_in_order_and_in_bounds(make_client: ClientFactory) -> None:
    """JSON-RPC 2.0 lets a server answer a batch's members concurrently: they are, at most
    BATCH_CONCURRENCY at a time, and the answers keep the batch's order."""
    node = CrowdedNode()
    client = proxy_client(make_client, node)
    calls = [{"jsonrpc": "2.0", "id": n, "method": "eth_blockNumber"} for n in range(80)]
    answers = client.post("/rpc", json=calls).json()
    assert [(answer["id"], answer["result"]) for answer in answers] == [
        (n, "0x10") for n in range(80)
    ]
    assert 1 < node.most_in_flight <= BATCH_CONCURRENCY


class CountingNode(CrowdedNode):
    """A node whose pending nonce counts the transactions sent to it."""

    def answer(self, method: str, params: list[Any]) -> Any:
        if method == "eth_getTransactionCount":
            return hex(5 + len(self.sent))
        return super().answer(method, params)


def test_a_batch_of_sends_from_one_sender_takes_nonces_one_after_another(
    make_client: ClientFactory, address: str
) -> None:
    """Members answered together still fill, sign and send one at a time per sender, so each
    takes the nonce the one before it left."""
    node = CountingNode()
    client = proxy_client(make_client, node)
    sends = [
        {
            "jsonrpc": "2.0",
            "id": n,
            "method": "eth_sendTransaction",
            "params": [{"from": address, "to": "0x" + "35" * 20, "value": hex(n + 1)}],
        }
        for n in range(4)
    ]
    answers = client.post("/rpc", json=sends).json()
    assert all("result" in answer for answer in answers), answers
    assert sorted(decoded(raw)["nonce"] for raw in node.sent) == [5, 6, 7, 8]


def test_a_node_that_is_down_is_a_json_rpc_error_without_its_url(
    make_client: ClientFactory, address: str
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = proxy_client(make_client, refuse)
    for method, params in (
        ("eth_blockNumber", []),
        ("eth_sendTransaction", [{"from": address, "to": address}]),
    ):
        answer = client.post(
            "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        )
        assert answer.status_code == 200
        failure = answer.json()["error"]
        assert failure["code"] == -32006
        assert failure["data"] == {"code": "dependency_unavailable"}
        assert "unreachable" in failure["message"]
        assert "secret-api-key" not in answer.text


def test_a_node_that_is_slow_times_out(make_client: ClientFactory) -> None:
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = proxy_client(make_client, stall)
    failure = error(client, "eth_gasPrice")
    assert failure["data"]["code"] == "dependency_unavailable"
    assert "in time" in failure["message"]


def test_unexpected_exceptions_are_internal_errors_without_detail(
    client: TestClient, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(**kwargs: Any) -> None:
        raise RuntimeError("secret internals: passphrase=hunter2")

    monkeypatch.setattr(signer, "list_keys", explode)
    answer = rpc(client, "eth_accounts")
    assert answer["error"] == {
        "code": -32603,
        "message": "internal error",
        "data": {"code": "internal_error"},
    }


def test_rpc_metrics_count_methods(make_client: ClientFactory, address: str) -> None:
    client = make_client()
    result(client, "eth_accounts")
    error(client, "whatever_method")
    text = client.get("/metrics").text
    assert 'signd_jsonrpc_calls_total{method="eth_accounts",outcome="ok"} 1' in text
    assert 'signd_jsonrpc_calls_total{method="other",outcome="error"} 1' in text


class MisleadingNode(FakeNode):
    """A node that answers one method with ``value`` (its result, or the whole answer object
    when ``raw``), and everything else as :class:`FakeNode` does."""

    def __init__(self, method: str, value: Any, *, raw: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.method, self.value, self.raw = method, value, raw

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        call = json.loads(request.content)
        if call["method"] == self.method and self.raw:
            self.calls.append(call)
            return httpx.Response(200, json=self.value)
        return await super().__call__(request)

    def answer(self, method: str, params: list[Any]) -> Any:
        return self.value if method == self.method else super().answer(method, params)


NONSENSE = {
    "past its range": "0x" + "f" * 64,
    "negative": "-0x1",
    "decimal minus": "-5",
    "no hex": "0xzz",
    "empty hex": "0x",
    "null": None,
    "float": 1.5,
    "object": {"a": 1},
    "boolean": True,
}


@pytest.mark.parametrize("nonsense", NONSENSE.values(), ids=NONSENSE.keys())
@pytest.mark.parametrize(
    ("method", "options", "transaction"),
    [
        ("eth_getTransactionCount", {}, {}),
        ("eth_estimateGas", {}, {}),
        ("eth_maxPriorityFeePerGas", {}, {}),
        ("eth_gasPrice", {}, {"type": "0x0"}),
        ("eth_chainId", {}, {}),
        ("eth_getBlockByNumber", {}, {}),
        ("eth_feeHistory", {"priority_method": False}, {}),
    ],
)
def test_a_node_answering_nonsense_to_a_fill_is_the_node_s_fault(
    make_client: ClientFactory,
    address: str,
    method: str,
    options: dict[str, Any],
    transaction: dict[str, Any],
    nonsense: Any,
) -> None:
    """What the node answers while filling is the node's word, not the caller's: a value it
    cannot mean is -32006 dependency_unavailable (never the caller's -32602 invalid params,
    never -32603), and nothing is signed or sent. A block and a fee history are objects: the
    nonsense goes in their base fee and reward (a null block or history is nonsense too)."""
    if nonsense is not None and method == "eth_getBlockByNumber":
        nonsense = {"number": "0x10", "baseFeePerGas": nonsense}
    elif nonsense is not None and method == "eth_feeHistory":
        nonsense = {"reward": [[nonsense]]}
    node = MisleadingNode(method, nonsense, **options)
    client = proxy_client(make_client, node)
    tx = {"from": address, "to": "0x" + "35" * 20, "value": "0x1", **transaction}
    for rpc_method in ("eth_sendTransaction", "eth_signTransaction"):
        failure = error(client, rpc_method, tx)
        assert failure["code"] == -32006, failure
        assert failure["data"] == {"code": "dependency_unavailable"}
        assert "downstream node" in failure["message"]
    assert node.sent == []


def test_quantities_the_node_answers_in_range_are_filled_as_hex(
    make_client: ClientFactory, address: str
) -> None:
    """A nonce just below 2**64 and a fee the node answers as a JSON number still fill."""
    node = MisleadingNode("eth_getTransactionCount", hex(2**64 - 2))
    client = proxy_client(make_client, node)
    answer = result(client, "eth_signTransaction", {"from": address, "to": address})
    assert answer["tx"]["nonce"] == hex(2**64 - 2)
    priced = MisleadingNode("eth_gasPrice", GAS_PRICE)
    legacy = proxy_client(make_client, priced)
    answer = result(legacy, "eth_signTransaction", {"from": address, "to": address, "type": "0x0"})
    assert answer["tx"]["gasPrice"] == hex(GAS_PRICE)


MALFORMED_ANSWERS = {
    "neither result nor error": {"jsonrpc": "2.0", "id": 1},
    "an error that is a string": {"jsonrpc": "2.0", "id": 1, "error": "boom"},
    "an error without an integer code": {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": "x", "message": {"deep": 1}},
    },
    "both result and error": {
        "jsonrpc": "2.0",
        "id": 1,
        "result": "0x1",
        "error": {"code": -1, "message": "m"},
    },
}


@pytest.mark.parametrize("answer", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
def test_a_malformed_node_answer_is_the_node_s_fault_forwarded_or_sent(
    make_client: ClientFactory, address: str, answer: dict[str, Any]
) -> None:
    """A forwarded call, and the submission of a signed transaction, answer -32006 when the
    node's answer is not a JSON-RPC answer (never its error object passed on as it is)."""
    for method, params in (
        ("eth_blockNumber", []),
        ("eth_sendRawTransaction", ["0x00"]),
        ("eth_sendTransaction", [{"from": address, "to": address}]),
    ):
        node_method = "eth_sendRawTransaction" if method == "eth_sendTransaction" else method
        client = proxy_client(make_client, MisleadingNode(node_method, answer, raw=True))
        failure = error(client, method, *params)
        assert failure["code"] == -32006, (method, failure)
        assert failure["data"] == {"code": "dependency_unavailable"}


def test_a_forwarded_answer_keeps_the_caller_s_id(make_client: ClientFactory) -> None:
    """The node's answer goes back under the caller's id, whatever id the node gave it."""
    node = MisleadingNode(
        "eth_blockNumber", {"jsonrpc": "2.0", "id": 999, "result": "0x10"}, raw=True
    )
    client = proxy_client(make_client, node)
    assert rpc(client, "eth_blockNumber") == {"jsonrpc": "2.0", "id": 7, "result": "0x10"}


def test_a_send_waits_for_the_senders_previous_one_at_most_the_downstream_timeout(
    make_client: ClientFactory, address: str
) -> None:
    """Sends from one sender go in turn; one behind a send held up by a slow node gets a
    503 (-32006) once it has waited the downstream timeout, not after the whole queue."""
    node = FakeNode()
    settings = ApiSettings(downstream=NODE_URL, downstream_timeout=SLOW_NODE_TIMEOUT)
    client = make_client(settings, downstream_transport=SlowNode(node))
    send = {"from": address, "to": "0x" + "35" * 20, "value": "0x1"}
    answers: list[tuple[float, dict[str, Any]]] = []

    def send_one() -> None:
        began = time.monotonic()
        answer = rpc(client, "eth_sendTransaction", send)
        answers.append((time.monotonic() - began, answer))

    first = threading.Thread(target=send_one)
    first.start()
    time.sleep(SLOW_NODE_CALL / 2)  # the first holds the sender's turn
    send_one()
    first.join()
    waited, refused = answers[0]
    assert refused["error"]["code"] == -32006
    assert "another eth_sendTransaction" in refused["error"]["message"]
    assert waited < SLOW_NODE_TIMEOUT + 1.0
    assert "result" in answers[1][1] and len(node.sent) == 1


class SlowNode(httpx.AsyncBaseTransport):
    """``node``, each call answered after :data:`SLOW_NODE_CALL` seconds."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(SLOW_NODE_CALL)
        return await self.node(request)


def test_a_senders_turns_are_forgotten_once_its_sends_are_done() -> None:
    asyncio.run(_senders_turns())


async def _senders_turns() -> None:
    turns = SenderTurns()
    order: list[str] = []

    async def send(sender: str, name: str, hold: float) -> None:
        async with turns.turn(sender, wait=5.0):
            order.append(name)
            await asyncio.sleep(hold)

    await asyncio.gather(send("0xa", "a1", 0.05), send("0xa", "a2", 0), send("0xb", "b1", 0))
    assert order == ["a1", "b1", "a2"]  # b is not held up by a's turn; a's sends in turn
    assert len(turns) == 0
    for number in range(100):  # a caller naming ever new senders leaves nothing behind
        async with turns.turn(f"0x{number:x}", wait=1.0):
            pass
    assert len(turns) == 0
