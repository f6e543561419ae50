"""Mostly valid signing requests with one thing wrong, through the real gates (in the service
and in an enclave) with a real key and a policy that allows them: every answer is either a
signature that eth-account recovers to the key's address, or a 4xx with a code and a
message. Never a 5xx, and the audit log stays whole."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.api import ApiSettings
from signd.audit import SealedAuditRecord
from signd.chains.ethereum.typed_data import typed_data_digest
from tests.api.samples import (
    MAIL,
    bytes_signer,
    hash_signer,
    text_signer,
    transaction_signer,
    typed_data_signer,
)
from tests.gate.support import (
    BOTH_GATES,
    BROAD_TOKEN,
    TestClient,
    assert_log_verifies,
    broad_gate_files,
    gated_service,
)
from tests.mutations import JUNK_TEXT, NAMES_TEXT, one_thing_wrong

pytestmark = BOTH_GATES

AUTH = {"authorization": f"Bearer {BROAD_TOKEN}"}
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

LONE = "\ud800"
"""Half of a UTF-16 pair: JSON can escape it (``\\ud800``); UTF-8 has no form for it."""


def post_text(client: TestClient, path: str, body: Any) -> Any:
    """``body`` as ``json.dumps`` writes it (lone surrogates escaped; httpx's own encoder
    cannot write them)."""
    headers = {**AUTH, "content-type": "application/json"}
    return client.post(path, content=json.dumps(body).encode(), headers=headers)


VALID_TRANSACTION: dict[str, Any] = {
    "type": "0x2",
    "chainId": "0x1",
    "nonce": "0x7",
    "to": "0x3535353535353535353535353535353535353535",
    "value": hex(10**15),
    "gas": hex(60_000),
    "maxFeePerGas": hex(30 * 10**9),
    "maxPriorityFeePerGas": hex(10**9),
    "data": "0xa9059cbb" + "00" * 64,
}
VALID_PAYLOADS: dict[str, tuple[str, Any]] = {
    "hash": ("hash", "0x" + "ab" * 32),
    "ethereum/transaction": ("transaction", VALID_TRANSACTION),
    "ethereum/message": ("message", "hello"),
    "ethereum/typed-data": ("typed_data", MAIL),
}


def wrong(valid: Any) -> st.SearchStrategy[Any]:
    """``valid`` with one thing wrong, which may be text without a UTF-8 form."""
    return one_thing_wrong(valid, JUNK_TEXT, NAMES_TEXT)


@st.composite
def signing_requests(draw: st.DrawFn, key_refs: list[str]) -> tuple[str, Any]:
    kind = draw(st.sampled_from(sorted(VALID_PAYLOADS)))
    field, payload = VALID_PAYLOADS[kind]
    valid = {"key": draw(st.sampled_from(key_refs)), field: payload}
    if draw(st.integers(0, 4)) == 0:
        drawn = [draw(wrong(valid)) for _ in range(2)]
        items = [{"type": kind, **item} if isinstance(item, dict) else item for item in drawn]
        return "/v1/sign/batch", {"requests": items}
    return f"/v1/sign/{kind}", draw(wrong(valid))


@pytest.fixture
def served(tmp_path: Path, gate_mode: str) -> Iterator[tuple[TestClient, dict[str, Any], Path]]:
    """The gated app, one key (sealed by the enclave with the enclave's gate) and the audit
    log. Afterwards the log must verify: with the MAC key here, or in the enclave that holds
    it."""
    settings_ = ApiSettings(allow_blind_signing=True, auth_failure_rate_limit=0.0)
    with (
        gated_service(tmp_path / "home", gate_mode, settings_, broad_gate_files) as gated,
        TestClient(gated.app) as client,
    ):
        custody = "enclave" if gate_mode == "enclave" else "keystore"
        made = client.post("/v1/keys", json={"chain": "ethereum", "custody": custody}, headers=AUTH)
        assert made.status_code == 201, made.text
        yield client, made.json()["keys"][0], gated.paths.audit_log
        assert assert_log_verifies(gated.gatekeeper, gated.paths) > 1


@pytest.fixture
def service(
    served: tuple[TestClient, dict[str, Any], Path],
) -> tuple[TestClient, dict[str, Any]]:
    client, key, _ = served
    return client, key


def signer_of(kind_path: str, request: dict[str, Any], answer: dict[str, Any]) -> str:
    """Who eth-account says signed ``answer`` to ``request``."""
    if kind_path.endswith("/hash"):
        return hash_signer(bytes.fromhex(request["hash"][2:]), answer)
    if kind_path.endswith("/transaction"):
        return transaction_signer(answer["raw_transaction"])
    if kind_path.endswith("/message"):
        message = request["message"]
        if isinstance(message, str):
            return text_signer(message, answer["signature"])
        return bytes_signer(bytes.fromhex(message["hex"][2:]), answer["signature"])
    return typed_data_signer(request["typed_data"], answer["signature"])


def check_error(status: int, answer: Any) -> None:
    assert 400 <= status < 500, (status, answer)
    error = answer["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]


@PROPERTY
@given(data=st.data())
def test_every_answer_is_a_true_signature_or_a_clear_4xx(
    service: tuple[TestClient, dict[str, Any]], data: st.DataObject
) -> None:
    client, key = service
    refs = [key["key_id"], key["address"], key["address"].lower(), "0x" + "12" * 20, "nokey"]
    path, body = data.draw(signing_requests(refs))
    response = post_text(client, path, body)
    answer = response.json()
    if response.status_code != 200:
        check_error(response.status_code, answer)
        return
    if path != "/v1/sign/batch":
        assert signer_of(path, body, answer) == key["address"]
        return
    for item, result in zip(body["requests"], answer["results"], strict=True):
        if "error" in result:
            check_error(400, {"error": result["error"]})
        else:
            assert signer_of("/" + item["type"], item, result) == key["address"]


RPC_INTERNAL_ERROR = -32603


@st.composite
def rpc_calls(draw: st.DrawFn, address: str) -> dict[str, Any]:
    """A JSON-RPC signing call with one thing wrong (or none), in its params or envelope."""
    transaction = {**VALID_TRANSACTION, "from": address}
    params = draw(
        st.sampled_from(
            [
                ("eth_sign", [address, "0x68656c6c6f"]),
                ("personal_sign", ["0x68656c6c6f", address]),
                ("eth_signTypedData_v4", [address, MAIL]),
                ("eth_signTransaction", [transaction]),
            ]
        )
    )
    method, valid = params
    call = {"jsonrpc": "2.0", "id": 7, "method": method, "params": valid}
    if draw(st.integers(0, 5)) == 0:
        return draw(wrong(call))  # type: ignore[no-any-return]
    return {**call, "params": draw(wrong(valid))}


def rpc_signer(call: dict[str, Any], result: Any) -> str:
    """Who eth-account says made the JSON-RPC ``result`` of ``call``."""
    method, params = call["method"], call["params"]
    if method == "eth_signTransaction":
        return transaction_signer(result["raw"])
    if method == "eth_signTypedData_v4":
        return typed_data_signer(params[1], result)
    data = params[1] if method == "eth_sign" else params[0]
    return bytes_signer(bytes.fromhex(data[2:]), result)


@PROPERTY
@given(data=st.data())
def test_every_json_rpc_answer_is_a_true_signature_or_a_clear_error(
    service: tuple[TestClient, dict[str, Any]], data: st.DataObject
) -> None:
    client, key = service
    call = data.draw(rpc_calls(key["address"]))
    response = post_text(client, "/rpc", call)
    assert response.status_code < 500, response.text
    if response.status_code == 204:  # a notification (no id): no answer
        return
    answer = response.json()
    for item in answer if isinstance(answer, list) else [answer]:  # junk may be a batch
        if "error" in item:
            error = item["error"]
            assert isinstance(error["code"], int) and error["code"] != RPC_INTERNAL_ERROR, error
            assert isinstance(error["message"], str) and error["message"]
        else:
            assert rpc_signer(call, item["result"]) == key["address"]


def mail_on_chain(declared: str, chain_id: Any) -> dict[str, Any]:
    """The Mail example with its domain's chainId declared as ``declared``."""
    document: dict[str, Any] = copy.deepcopy(MAIL)
    for field in document["types"]["EIP712Domain"]:
        if field["name"] == "chainId":
            field["type"] = declared
    document["domain"]["chainId"] = chain_id
    return document


def test_a_typed_data_chain_id_not_declared_uint_is_refused(
    service: tuple[TestClient, dict[str, Any]],
) -> None:
    """The policy allows typed data on chain 1 only. Each of these chainIds would have been
    read as 1 and signed, but what is signed is that text or those bytes, not chain 1's
    domain: REST and JSON-RPC refuse them, naming the field."""
    client, key = service
    for declared, chain_id in [
        ("string", "1"),
        ("string", " 1"),
        ("string", "0x1"),
        ("bytes32", "0x" + "00" * 31 + "01"),
        ("address", "0x" + "00" * 19 + "01"),
        ("int256", 1),
    ]:
        document = mail_on_chain(declared, chain_id)
        body = {"key": key["key_id"], "typed_data": document}
        response = client.post("/v1/sign/ethereum/typed-data", json=body, headers=AUTH)
        assert response.status_code == 400, (declared, chain_id, response.text)
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_field", "domain.chainId")
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_signTypedData_v4",
            "params": [key["address"], document],
        }
        answer = client.post("/rpc", json=call, headers=AUTH).json()
        assert answer["error"]["data"] == {"code": "invalid_field", "field": "domain.chainId"}


def test_a_typed_data_chain_id_declared_uint_is_judged_as_the_number_signed(
    service: tuple[TestClient, dict[str, Any]],
) -> None:
    client, key = service
    for declared, chain_id, allowed in [
        ("uint256", "0x1", True),
        ("uint8", "1", True),
        ("uint64", "0x0001", True),
        ("uint8", 5, False),
        ("uint256", "0x5", False),
    ]:
        document = mail_on_chain(declared, chain_id)
        body = {"key": key["key_id"], "typed_data": document}
        response = client.post("/v1/sign/ethereum/typed-data", json=body, headers=AUTH)
        if not allowed:
            assert response.status_code == 403, (declared, chain_id, response.text)
            continue
        assert response.status_code == 200, (declared, chain_id, response.text)
        signature = response.json()["signature"]
        digest = typed_data_digest(document)
        assert Account._recover_hash(digest, signature=signature) == key["address"]


def mail_with_domain_field(name: str, declared: str, value: Any) -> dict[str, Any]:
    """The Mail example with its domain's field ``name`` declared as ``declared``."""
    document: dict[str, Any] = copy.deepcopy(MAIL)
    for field in document["types"]["EIP712Domain"]:
        if field["name"] == name:
            field["type"] = declared
    document["domain"][name] = value
    return document


def test_a_typed_data_domain_field_in_another_type_is_refused(
    service: tuple[TestClient, dict[str, Any]],
) -> None:
    """A verifyingContract declared string is signed as the hash of its text, not as the
    contract's address a rule names (and a name declared bytes32 as bytes, not as text):
    the policy would judge one domain and the key sign another, so these are refused."""
    client, key = service
    contract = MAIL["domain"]["verifyingContract"]
    for name, declared, value in [
        ("verifyingContract", "string", contract),
        ("verifyingContract", "bytes20", contract),
        ("name", "bytes32", "0x" + b"Ether Mail".hex().ljust(64, "0")),
        ("version", "uint256", 1),
    ]:
        document = mail_with_domain_field(name, declared, value)
        body = {"key": key["key_id"], "typed_data": document}
        response = client.post("/v1/sign/ethereum/typed-data", json=body, headers=AUTH)
        assert response.status_code == 400, (name, declared, response.text)
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_field", f"domain.{name}")
    as_declared = mail_with_domain_field("verifyingContract", "address", contract)
    body = {"key": key["key_id"], "typed_data": as_declared}
    assert client.post("/v1/sign/ethereum/typed-data", json=body, headers=AUTH).status_code == 200


def lone_surrogate_requests(key: dict[str, Any]) -> list[tuple[str, Any, str | None]]:
    """Requests each holding one lone surrogate, and the field a refusal names."""
    ref = key["key_id"]
    address = key["address"]
    transaction = {"to": None, "nonce": 0, "gas": 21000, "gasPrice": 1, "chainId": 1}
    mail = copy.deepcopy(MAIL)
    mail["domain"][LONE] = 1
    return [
        ("/v1/sign/ethereum/transaction", {"key": ref, "transaction": {LONE: 1}}, "transaction"),
        ("/v1/sign/ethereum/transaction", {"key": ref, "transaction": transaction, LONE: 1}, None),
        ("/v1/sign/ethereum/typed-data", {"key": ref, "typed_data": mail}, "typed_data.domain"),
        ("/v1/sign/ethereum/message", {"key": ref, "message": "a" + LONE}, "message"),
        ("/v1/sign/ethereum/message", {"key": LONE, "message": "x"}, "key"),
        (
            "/v1/sign/batch",
            {"requests": [{"type": "ethereum/message", "key": ref, "message": "x", LONE: 1}]},
            "requests[0]",
        ),
        ("/v1/keys", {"chain": "ethereum", "custody": "keystore", LONE: 1}, None),
        ("/rpc", {"jsonrpc": "2.0", "id": LONE, "method": "eth_accounts"}, None),
        ("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "x" + LONE}, None),
        ("/rpc", [{"jsonrpc": "2.0", "id": 1, "method": "x" + LONE}], None),
        (
            "/rpc",
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_signTransaction",
                "params": [{**transaction, "from": address, LONE: 1}],
            },
            None,
        ),
    ]


def test_text_that_is_not_unicode_is_refused_and_the_audit_chain_stays_whole(
    served: tuple[TestClient, dict[str, Any], Path],
) -> None:
    """A lone surrogate anywhere in a request, in a value or a name, is refused as the request
    is read: a 400 naming where (REST), a -32700 parse error (JSON-RPC). It used to be echoed
    into an error the enclave could not encode after it had sealed the refusal's audit
    record: the host got a 500, the record was lost, and the next request of any client
    waited 5 s for it and failed with a 503."""
    client, key, audit_log = served
    sign = {"key": key["key_id"], "message": "after"}
    for path, body, field in lone_surrogate_requests(key):
        response = post_text(client, path, body)
        if path == "/rpc":
            assert response.status_code == 200, (body, response.text)
            assert response.json()["error"]["code"] == -32700, (body, response.text)
            assert response.json()["id"] is None
        else:
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_field", (body, response.text)
            assert error.get("field") == field, (body, response.text)
            assert "lone UTF-16 surrogate" in error["message"]
        started = time.monotonic()
        after = client.post("/v1/sign/ethereum/message", json=sign, headers=AUTH)
        assert after.status_code == 200, (body, after.text)
        assert time.monotonic() - started < 2.0, body
    # the fixture verifies the whole log; nothing was lost on the way to it
    lines = audit_log.read_bytes().splitlines()
    records = [SealedAuditRecord.from_json(line) for line in lines]
    assert all(not item.record.operation.startswith("audit:") for item in records)


def test_a_pair_of_surrogates_is_one_character_and_signs(
    service: tuple[TestClient, dict[str, Any]],
) -> None:
    client, key = service
    body = {"key": key["key_id"], "message": "\U0001f600"}  # \ud83d\ude00 in the JSON text
    response = post_text(client, "/v1/sign/ethereum/message", body)
    assert response.status_code == 200, response.text
    assert text_signer("\U0001f600", response.json()["signature"]) == key["address"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=1&limit=2", "limit"),
        ("custody=keystore&custody=enclave", "custody"),
        ("bogus=1", "bogus"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
    ],
)
def test_a_key_list_query_is_read_as_the_gate_reads_it(
    service: tuple[TestClient, dict[str, Any]], query: str, field: str
) -> None:
    """An unknown, repeated or malformed parameter is refused (the enclave's reading refuses
    it, and the enclave then neither decides nor audits the read: serving it anyway would
    skip both). The same in the service's own gate."""
    client, key = service
    listed = client.get(f"/v1/keys?custody={key['custody']}&limit=1", headers=AUTH)
    assert listed.status_code == 200, listed.text
    response = client.get(f"/v1/keys?{query}", headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    signs_after(client, key)


def signs_after(client: TestClient, key: dict[str, Any]) -> None:
    """A signature still comes (and gives the audit log a record past the key's)."""
    body = {"key": key["key_id"], "message": "after"}
    response = client.post("/v1/sign/ethereum/message", json=body, headers=AUTH)
    assert response.status_code == 200, response.text


def test_a_key_read_takes_no_query_string(service: tuple[TestClient, dict[str, Any]]) -> None:
    client, key = service
    assert client.get(f"/v1/keys/{key['key_id']}", headers=AUTH).status_code == 200
    refused = client.get(f"/v1/keys/{key['key_id']}?x=1", headers=AUTH)
    assert refused.status_code == 400, refused.text
    assert "takes no query string" in refused.json()["error"]["message"]
    custody = key["custody"]
    listed = client.get(f"/v1/keys?custody={custody}&limit=5&label=", headers=AUTH)
    assert listed.status_code == 200, listed.text
    assert [item["key_id"] for item in listed.json()["keys"]] == [key["key_id"]]
    signs_after(client, key)
