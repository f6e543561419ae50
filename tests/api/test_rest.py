"""The REST API in-process: shapes, status codes and every error path."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import coincurve
import pytest
from eth_account import Account
from eth_account._utils.encode_typed_data.encoding_and_hashing import hash_domain
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from signd.api import ApiSettings, Principal, SigningKind, create_app
from signd.api.rest import send_json
from signd.api.service import UngatedSigner
from signd.chains.ethereum.transactions import MAX_CHAIN_ID, decode_transaction
from signd.crypto.secp256k1 import CURVE_ORDER, RecoverableSignature, sign_digest_with
from signd.custody.base import AddressDeriver, CustodyBackend, KeyInfo, KeyPage
from signd.errors import AccessDenied, ConfigurationError, DependencyUnavailable
from signd.gate import Signed, SigningCall
from signd.operations import Signer
from signd.operations.signer import signature_json, signature_to_dict
from tests.api import samples
from tests.api.conftest import ClientFactory, make_home, open_signer

ETH = {"chain": "ethereum", "custody": "keystore"}


def error_of(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error.get("field") == field
    return error


# keys


def test_create_keys_returns_201_and_the_keyinfo_shape(client: TestClient) -> None:
    response = client.post("/v1/keys", json={**ETH, "count": 3, "labels": ["hot", "eu"]})
    assert response.status_code == 201
    keys = response.json()["keys"]
    assert len(keys) == 3
    assert len({key["address"] for key in keys}) == 3
    for key in keys:
        assert {"key_id", "chain", "address", "public_key", "custody", "created_at", "labels"} <= (
            set(key)
        )
        assert key["chain"] == "ethereum" and key["custody"] == "keystore"
        assert key["labels"] == ["hot", "eu"]
        assert key["address"].startswith("0x") and len(key["address"]) == 42


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"custody": "keystore"}, "chain"),
        ({"chain": 5, "custody": "keystore"}, "chain"),
        ({"chain": "ethereum"}, "custody"),
        ({**ETH, "count": "2"}, "count"),
        ({**ETH, "count": True}, "count"),
        ({**ETH, "count": 0}, "count"),
        ({**ETH, "count": 1001}, "count"),
        ({**ETH, "labels": "hot"}, "labels"),
        ({**ETH, "labels": [1]}, "labels"),
        ({**ETH, "colour": "red"}, "colour"),
        ({"chain": "dogecoin", "custody": "keystore"}, "chain"),
        ({"chain": "ethereum", "custody": "vault"}, "custody"),
    ],
)
def test_create_keys_names_the_wrong_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    error_of(client.post("/v1/keys", json=body), 400, "invalid_field", field)


def test_get_key_by_id_and_by_address(client: TestClient, eth_key: dict[str, Any]) -> None:
    by_id = client.get(f"/v1/keys/{eth_key['key_id']}")
    by_address = client.get(f"/v1/keys/{eth_key['address'].lower()}")
    assert by_id.status_code == by_address.status_code == 200
    assert by_id.json() == by_address.json() == eth_key


def test_unknown_key_is_404(client: TestClient) -> None:
    error_of(client.get("/v1/keys/0x" + "00" * 20), 404, "key_not_found")
    error_of(client.get("/v1/keys/no-such-key"), 404, "key_not_found")


def test_list_keys_pages_and_filters(client: TestClient) -> None:
    client.post("/v1/keys", json={**ETH, "count": 3})
    client.post("/v1/keys", json={**ETH, "labels": ["cold"]})
    first = client.get("/v1/keys", params={"limit": 2})
    assert first.status_code == 200
    assert len(first.json()["keys"]) == 2 and first.json()["next_cursor"]
    rest = client.get("/v1/keys", params={"limit": 10, "cursor": first.json()["next_cursor"]})
    assert len(rest.json()["keys"]) == 2 and rest.json()["next_cursor"] is None
    listed = [key["address"] for key in first.json()["keys"] + rest.json()["keys"]]
    assert len(set(listed)) == 4
    cold = client.get("/v1/keys", params={"custody": "keystore", "label": "cold"}).json()
    assert [key["labels"] for key in cold["keys"]] == [["cold"]]
    assert client.get("/v1/keys", params={"chain": "ethereum"}).json()["keys"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"limit": "9" * 5000}, "limit"),  # past int()'s digit limit: was a 500
        ({"custody": "vault"}, "custody"),
    ],
)
def test_list_keys_refuses_bad_parameters(
    client: TestClient, params: dict[str, str], field: str
) -> None:
    error_of(client.get("/v1/keys", params=params), 400, "invalid_field", field)


def test_list_keys_refuses_a_cursor_altered_or_from_another_listing(client: TestClient) -> None:
    """The keystore's cursors are bound to it and to their filters, as the metadata
    stores' are: a forged one, even one past every key (SQLite cannot bind its position),
    or one from another listing is 400, never a 500 nor a page that silently skips keys."""
    client.post("/v1/keys", json={**ETH, "count": 3, "labels": ["hot"]})
    client.post("/v1/keys", json={**ETH, "count": 2, "labels": ["cold"]})
    cursor = client.get("/v1/keys", params={"label": "hot", "limit": 1}).json()["next_cursor"]
    past_every_key = base64.urlsafe_b64encode(b"k" + b"\xff" * 8).decode().rstrip("=")
    first_key = base64.urlsafe_b64encode(b"k" + (1).to_bytes(8, "big")).decode().rstrip("=")
    altered = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
    for bad in (past_every_key, first_key, altered, cursor + "." + cursor):
        error_of(client.get("/v1/keys", params={"cursor": bad}), 400, "invalid_field", "cursor")
    for other in ({"label": "cold"}, {}, {"label": "hot", "chain": "ethereum"}):
        answer = client.get("/v1/keys", params={**other, "cursor": cursor})
        error_of(answer, 400, "invalid_field", "cursor")
    rest = client.get("/v1/keys", params={"label": "hot", "cursor": cursor}).json()
    assert [key["labels"] for key in rest["keys"]] == [["hot"], ["hot"]]


# signing


def test_blind_signing_is_refused_by_default(client: TestClient, eth_key: dict[str, Any]) -> None:
    response = client.post(
        "/v1/sign/hash", json={"key": eth_key["address"], "hash": "0x" + "11" * 32}
    )
    error = error_of(response, 403, "blind_signing_disabled", "type")
    assert "allow_blind_signing" in error["message"]


def test_blind_signing_when_enabled(make_client: ClientFactory) -> None:
    client = make_client(ApiSettings(allow_blind_signing=True))
    key = client.post("/v1/keys", json=ETH).json()["keys"][0]
    digest = keccak(b"a 32-byte digest")
    response = client.post(
        "/v1/sign/hash", json={"key": key["key_id"], "hash": "0x" + digest.hex()}
    )
    assert response.status_code == 200
    result = response.json()
    assert set(result) == {"signature", "r", "s", "recovery_id"}
    assert samples.hash_signer(digest, result) == key["address"]
    error_of(
        client.post("/v1/sign/hash", json={"key": key["key_id"], "hash": "0x1234"}),
        400,
        "invalid_field",
        "hash",
    )


def test_sign_transaction(client: TestClient, eth_key: dict[str, Any]) -> None:
    response = client.post(
        "/v1/sign/ethereum/transaction",
        json={"key": eth_key["address"], "transaction": samples.transaction()},
    )
    assert response.status_code == 200
    result = response.json()
    assert set(result) == {"raw_transaction", "hash", "from"}
    assert result["from"] == eth_key["address"]
    assert samples.transaction_signer(result["raw_transaction"]) == eth_key["address"]
    assert result["hash"] == "0x" + keccak(hexstr=result["raw_transaction"]).hex()


def test_sign_transaction_errors_name_the_transaction_field(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    tx = samples.transaction()
    del tx["nonce"]
    response = client.post(
        "/v1/sign/ethereum/transaction", json={"key": eth_key["key_id"], "transaction": tx}
    )
    error_of(response, 400, "invalid_field", "nonce")
    response = client.post(
        "/v1/sign/ethereum/transaction", json={"key": eth_key["key_id"], "transaction": [1]}
    )
    error_of(response, 400, "invalid_field", "transaction")
    other = "0x" + "12" * 20
    response = client.post(
        "/v1/sign/ethereum/transaction",
        json={"key": eth_key["key_id"], "transaction": {**samples.transaction(), "from": other}},
    )
    error_of(response, 400, "invalid_signature")


def test_a_chain_id_above_eip_2294_is_not_signed(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    """A legacy transaction's v grows with its chain id: with chainId 2**256-1 it would not
    fit the 256 bits a decoder reads, so signd would sign what it cannot decode itself."""
    legacy = {
        "chainId": hex(MAX_CHAIN_ID),
        "nonce": "0x0",
        "gasPrice": hex(10**9),
        "gas": hex(21000),
        "to": "0x3535353535353535353535353535353535353535",
    }
    for chain_id in (MAX_CHAIN_ID + 1, 2**256 - 1):
        response = client.post(
            "/v1/sign/ethereum/transaction",
            json={"key": eth_key["address"], "transaction": {**legacy, "chainId": hex(chain_id)}},
        )
        error_of(response, 400, "invalid_field", "chainId")
    response = client.post(
        "/v1/sign/ethereum/transaction", json={"key": eth_key["address"], "transaction": legacy}
    )
    assert response.status_code == 200, response.text
    raw = bytes.fromhex(response.json()["raw_transaction"][2:])
    assert decode_transaction(raw).transaction.chain_id == MAX_CHAIN_ID


@pytest.mark.parametrize(
    ("message", "check"),
    [
        ("hello signd", lambda sig: samples.text_signer("hello signd", sig)),
        ({"hex": "0x00ff10"}, lambda sig: samples.bytes_signer(b"\x00\xff\x10", sig)),
        ("", lambda sig: samples.text_signer("", sig)),
    ],
)
def test_sign_message_text_or_hex(
    client: TestClient, eth_key: dict[str, Any], message: Any, check: Callable[[str], str]
) -> None:
    response = client.post(
        "/v1/sign/ethereum/message", json={"key": eth_key["address"], "message": message}
    )
    assert response.status_code == 200
    result = response.json()
    assert set(result) == {"signature", "v", "r", "s"} and result["v"] in (27, 28)
    assert check(result["signature"]) == eth_key["address"]


def test_a_signing_body_sent_in_chunks_is_signed_whole(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    body = json.dumps({"key": eth_key["address"], "message": "in pieces"}).encode()
    chunks = iter([body[:5], body[5:17], body[17:]])  # chunked transfer: no content-length
    response = client.post("/v1/sign/ethereum/message", content=chunks)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert samples.text_signer("in pieces", response.json()["signature"]) == eth_key["address"]


@pytest.mark.parametrize(
    ("message", "field"),
    [(5, "message"), ({"hex": "0xabc"}, "message.hex"), ({"hex": "00", "x": 1}, "message")],
)
def test_sign_message_refuses_other_shapes(
    client: TestClient, eth_key: dict[str, Any], message: Any, field: str
) -> None:
    response = client.post(
        "/v1/sign/ethereum/message", json={"key": eth_key["address"], "message": message}
    )
    error_of(response, 400, "invalid_field", field)


def test_sign_typed_data(client: TestClient, eth_key: dict[str, Any]) -> None:
    response = client.post(
        "/v1/sign/ethereum/typed-data", json={"key": eth_key["key_id"], "typed_data": samples.MAIL}
    )
    assert response.status_code == 200
    assert (
        samples.typed_data_signer(samples.MAIL, response.json()["signature"])
        == (eth_key["address"])
    )
    broken = {**samples.MAIL, "primaryType": "Nope"}
    response = client.post(
        "/v1/sign/ethereum/typed-data", json={"key": eth_key["key_id"], "typed_data": broken}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_typed_data"


def test_sign_typed_data_of_primary_type_eip712_domain_signs_no_message(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    """The domain alone is signed, as MetaMask signs it: a message beside it is refused."""
    domain_only = {**samples.MAIL, "primaryType": "EIP712Domain", "message": {}}
    response = client.post(
        "/v1/sign/ethereum/typed-data", json={"key": eth_key["key_id"], "typed_data": domain_only}
    )
    assert response.status_code == 200, response.text
    digest = keccak(b"\x19\x01" + hash_domain(samples.MAIL["domain"]))
    signer = Account._recover_hash(digest, signature=response.json()["signature"])
    assert signer == eth_key["address"]
    with_message = {**domain_only, "message": samples.MAIL["message"]}
    response = client.post(
        "/v1/sign/ethereum/typed-data", json={"key": eth_key["key_id"], "typed_data": with_message}
    )
    error_of(response, 400, "invalid_typed_data", "message")


def test_signing_with_an_unknown_key_is_404(client: TestClient) -> None:
    response = client.post(
        "/v1/sign/ethereum/message", json={"key": "0x" + "ab" * 20, "message": "x"}
    )
    error_of(response, 404, "key_not_found")
    huge = client.post("/v1/sign/ethereum/message", json={"key": "k" * 500_000, "message": "x"})
    assert error_of(huge, 404, "key_not_found")["message"] == f"no key {'k' * 64!r}..."


def test_an_error_quoting_what_was_sent_is_cut_short(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    """Messages quote the caller's input; a name of 200,000 characters comes back bounded."""
    name = "S" * 200_000
    document = {"types": {name: []}, "primaryType": name + "x", "domain": {}, "message": {}}
    body = {"key": eth_key["address"], "typed_data": document}
    answer = client.post("/v1/sign/ethereum/typed-data", json=body)
    error = error_of(answer, 400, "invalid_typed_data", "primaryType")
    assert error["message"].startswith("undefined struct type")
    assert len(error["message"]) <= 1024 + 3 and error["message"].endswith("...")


def test_batch_mixes_results_and_errors_in_order(
    client: TestClient, eth_key: dict[str, Any]
) -> None:
    key = eth_key["address"]
    no_nonce = {k: v for k, v in samples.transaction().items() if k != "nonce"}
    requests: list[Any] = [
        {"type": "ethereum/message", "key": key, "message": "one"},
        {"type": "hash", "key": key, "hash": "0x" + "22" * 32},
        {"type": "ethereum/transaction", "key": key, "transaction": samples.transaction()},
        {"type": "ethereum/typed-data", "key": key, "typed_data": samples.MAIL},
        {"type": "ethereum/message", "key": "0x" + "00" * 20, "message": "two"},
        {"type": "ethereum/transaction", "key": key, "transaction": no_nonce},
        {"type": "ethereum/message", "key": key, "message": {"hex": "0x74776f"}},
    ]
    response = client.post("/v1/sign/batch", json={"requests": requests})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(requests)
    assert samples.text_signer("one", results[0]["signature"]) == key
    assert results[1]["error"]["code"] == "blind_signing_disabled"
    assert samples.transaction_signer(results[2]["raw_transaction"]) == key
    assert samples.typed_data_signer(samples.MAIL, results[3]["signature"]) == key
    assert results[4]["error"]["code"] == "key_not_found"
    assert results[5]["error"] == {**results[5]["error"], "code": "invalid_field", "field": "nonce"}
    assert samples.text_signer("two", results[6]["signature"]) == key


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("not an object", "requests[1]"),
        ({"type": "bitcoin/psbt", "key": "k"}, "requests[1].type"),
        ({"key": "k", "message": "m"}, "requests[1].type"),
        ({"type": "ethereum/message", "key": "k", "message": "m", "x": 1}, "requests[1].x"),
        ({"type": "hash", "key": "k", "hash": "0x12"}, "requests[1].hash"),
        ({"type": "ethereum/message", "message": "m"}, "requests[1].key"),
    ],
)
def test_a_malformed_batch_item_fails_the_whole_batch(
    client: TestClient, eth_key: dict[str, Any], item: Any, field: str
) -> None:
    good = {"type": "ethereum/message", "key": eth_key["address"], "message": "m"}
    response = client.post("/v1/sign/batch", json={"requests": [good, item]})
    error_of(response, 400, "invalid_field", field)


@pytest.mark.parametrize("requests", [[], "x", None, [{}] * 4])
def test_batch_size_and_shape_are_bounded(make_client: ClientFactory, requests: Any) -> None:
    client = make_client(ApiSettings(max_batch=3))
    error_of(
        client.post("/v1/sign/batch", json={"requests": requests}), 400, "invalid_field", "requests"
    )


# errors at the HTTP layer


@pytest.mark.parametrize("body", [b"{not json", b"NaN", b'{"key": NaN}', b"\xff\xfe", b""])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    response = client.post(
        "/v1/sign/ethereum/message", content=body, headers={"content-type": "application/json"}
    )
    error_of(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"key": "a", "key": "b", "message": "m"}', "'key' is given twice"),
        (b'{"key": "a", "message": {"text": "m", "text": "n"}}', "'text' is given twice"),
        (b'{"key": "a", "message": 1e400}', "1e400 is out of range"),
    ],
)
def test_json_that_readers_may_disagree_on_is_400(
    client: TestClient, eth_key: dict[str, Any], body: bytes, says: str
) -> None:
    """A name given twice (a reader in front of signd may take the other value) and a number
    no float holds are refused, with the reason."""
    content = body.replace(b'"a"', json.dumps(eth_key["address"]).encode(), 1)
    response = client.post(
        "/v1/sign/ethereum/message", content=content, headers={"content-type": "application/json"}
    )
    assert says in error_of(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None])
def test_a_body_that_is_not_an_object_is_400(client: TestClient, body: Any) -> None:
    error_of(client.post("/v1/keys", json=body), 400, "invalid_request")


def test_body_too_large_is_413(make_client: ClientFactory) -> None:
    client = make_client(ApiSettings(max_body_bytes=64))
    big = {"key": "k", "message": "x" * 100}
    error_of(client.post("/v1/sign/ethereum/message", json=big), 413, "payload_too_large")
    chunks = iter([b'{"key": "k", "message": "', b"x" * 40, b"y" * 40, b'"}'])
    response = client.post("/v1/sign/ethereum/message", content=chunks)  # chunked: no length
    error_of(response, 413, "payload_too_large")


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    error_of(client.get("/v2/keys"), 404, "not_found")
    error_of(client.post("/v1/sign/bitcoin/psbt", json={}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/rpc/"),
        ("GET", "/v1/keys/"),
        ("POST", "/v1/keys/"),
        ("POST", "/v1/sign/ethereum/message/"),
    ],
)
def test_a_trailing_slash_is_an_unknown_route_not_a_redirect(
    client: TestClient, method: str, path: str
) -> None:
    """Starlette's default redirect to the path without the slash takes its host from the
    Host header: an open redirect to wherever the caller names."""
    response = client.request(
        method, path, json={}, headers={"host": "evil.example"}, follow_redirects=False
    )
    error_of(response, 404, "not_found")
    assert "location" not in response.headers


def test_wrong_method_is_a_json_405(client: TestClient) -> None:
    response = client.delete("/v1/keys")
    error_of(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    error_of(client.get("/v1/sign/batch"), 405, "method_not_allowed")
    error_of(client.get("/rpc"), 405, "method_not_allowed")


def test_unexpected_exceptions_are_500_without_detail(
    client: TestClient, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(ref: str) -> KeyInfo:
        raise RuntimeError("secret internals: passphrase=hunter2")

    monkeypatch.setattr(signer, "get_key", explode)
    response = client.get("/v1/keys/anything")
    error = error_of(response, 500, "internal_error")
    assert error["message"] == "internal error"
    assert "hunter2" not in response.text and "Traceback" not in response.text


# seams: authentication and the signing gate


def test_the_gate_and_authenticator_are_consulted(
    make_client: ClientFactory, signer: Signer
) -> None:
    seen: list[tuple[str, SigningKind, str]] = []

    async def authenticate(request: Any) -> Principal:
        return Principal(request.headers.get("x-client", "nobody"))

    class OnlyAlice(UngatedSigner):
        def sign(
            self, principal: Principal, calls: Sequence[SigningCall]
        ) -> list[Signed | Exception]:
            seen.extend((principal.name, call.kind, call.key) for call in calls)
            if principal.name != "alice":
                return [AccessDenied(f"{principal.name} may not sign") for _ in calls]
            return super().sign(principal, calls)

    client = make_client(authenticate=authenticate, gate=OnlyAlice(signer))
    key = client.post("/v1/keys", json=ETH).json()["keys"][0]["address"]
    body = {"key": key, "message": "m"}
    assert client.post(
        "/v1/sign/ethereum/message", json=body, headers={"x-client": "alice"}
    ).is_success
    error_of(
        client.post("/v1/sign/ethereum/message", json=body, headers={"x-client": "eve"}),
        403,
        "access_denied",
    )
    assert seen == [("alice", SigningKind.ETH_MESSAGE, key), ("eve", SigningKind.ETH_MESSAGE, key)]


def test_an_authenticated_app_needs_a_gate(signer: Signer) -> None:
    async def authenticate(request: Any) -> Principal:
        return Principal("someone")

    with pytest.raises(ConfigurationError, match="needs its gate"):
        create_app(signer, authenticate=authenticate)


# health, readiness, metrics, logs


class UnhealthyBackend(CustodyBackend):
    """Holds no keys and reports its dependency down."""

    custody_type = "hsm"

    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        raise DependencyUnavailable("the HSM is unreachable")

    def find_key(self, ref: str) -> KeyInfo | None:
        return None

    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        return KeyPage([], None)

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes:
        raise DependencyUnavailable("the HSM is unreachable")

    def check_health(self) -> None:
        raise DependencyUnavailable("HSM session lost")


def test_healthz_and_readyz_when_all_is_well(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "parts": [{"part": "custody:keystore", "status": "ok"}]}


def test_readyz_names_the_backend_that_is_down(make_client: ClientFactory, tmp_path: Path) -> None:
    keystore = open_signer(make_home(tmp_path / "other")).backend("keystore")

    def cannot_open() -> CustodyBackend:
        raise DependencyUnavailable("KMS is unreachable")

    signer = Signer({"keystore": lambda: keystore, "hsm": UnhealthyBackend, "enclave": cannot_open})
    client = make_client(over=signer)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    parts = {part["part"]: part for part in body["parts"]}
    assert parts["custody:keystore"]["status"] == "ok"
    assert parts["custody:hsm"] == {
        "part": "custody:hsm",
        "status": "unavailable",
        "code": "dependency_unavailable",
        "message": "HSM session lost",
    }
    assert parts["custody:enclave"]["message"] == "KMS is unreachable"
    assert client.get("/healthz").status_code == 200
    keystore.close()


def test_readyz_does_not_wait_for_a_backend_that_hangs(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    release = threading.Event()

    class HangingBackend(UnhealthyBackend):
        def check_health(self) -> None:
            release.wait(5)

    keystore = open_signer(make_home(tmp_path / "other")).backend("keystore")
    signer = Signer({"keystore": lambda: keystore, "hsm": HangingBackend})
    client = make_client(ApiSettings(health_timeout=0.2), over=signer)
    try:
        response = client.get("/readyz")
    finally:
        release.set()
    assert response.status_code == 503
    hsm = next(part for part in response.json()["parts"] if part["part"] == "custody:hsm")
    assert hsm["code"] == "dependency_unavailable" and "0.2s" in hsm["message"]
    keystore.close()


def metric(client: TestClient, name: str, **labels: str) -> float:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_counters_move(client: TestClient, eth_key: dict[str, Any]) -> None:
    signatures = {"chain": "ethereum", "custody": "keystore", "kind": "ethereum/message"}
    requests = {"route": "/v1/sign/ethereum/message", "method": "POST", "status": "200"}
    before = metric(client, "signd_signatures_total", **signatures)
    before_requests = metric(client, "signd_http_requests_total", **requests)
    before_errors = metric(client, "signd_errors_total", code="key_not_found")
    for _ in range(2):
        client.post("/v1/sign/ethereum/message", json={"key": eth_key["address"], "message": "m"})
    client.get("/v1/keys/missing")
    assert metric(client, "signd_signatures_total", **signatures) == before + 2
    assert metric(client, "signd_http_requests_total", **requests) == before_requests + 2
    assert metric(client, "signd_errors_total", code="key_not_found") == before_errors + 1
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert (
        'signd_http_request_duration_seconds_bucket{route="/v1/sign/ethereum/message",le="+Inf"}'
        in text.text
    )
    client.get("/no/such/route/0x1234")
    assert (
        metric(client, "signd_http_requests_total", route="unmatched", method="GET", status="404")
        >= 1
    )


def test_one_json_log_line_per_request_with_its_id_and_no_body(
    client: TestClient, eth_key: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.api.access")
    response = client.post(
        "/v1/sign/ethereum/message",
        json={"key": eth_key["address"], "message": "a private memo"},
        headers={"x-request-id": "req-42"},
    )
    assert response.headers["x-request-id"] == "req-42"
    generated = client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "signd.api.access"]
    assert len(lines) == 2
    first = lines[0]
    assert first["request_id"] == "req-42"
    assert (first["method"], first["path"], first["route"], first["status"]) == (
        "POST",
        "/v1/sign/ethereum/message",
        "/v1/sign/ethereum/message",
        200,
    )
    assert first["duration_ms"] >= 0
    assert lines[1]["request_id"] == generated.headers["x-request-id"]
    assert "private memo" not in caplog.text


# the enclave custody, through the auto-started local enclave process


@pytest.mark.integration
def test_enclave_custody_through_the_local_enclave_process(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    with open_signer(make_home(tmp_path / "enclave-home", ("enclave", "keystore"))) as signer:
        client = make_client(over=signer)
        response = client.post("/v1/keys", json={"chain": "ethereum", "custody": "enclave"})
        assert response.status_code == 201, response.text
        key = response.json()["keys"][0]
        assert key["custody"] == "enclave"
        signed = client.post(
            "/v1/sign/ethereum/transaction",
            json={"key": key["address"], "transaction": samples.transaction(chain_id=5)},
        ).json()
        assert samples.transaction_signer(signed["raw_transaction"]) == key["address"]
        ready = client.get("/readyz").json()
        assert ready["ready"] is True
        assert {part["part"] for part in ready["parts"]} == {"custody:enclave", "custody:keystore"}


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(content=JSON_VALUES, status=st.sampled_from([200, 400, 401, 503]))
def test_signing_answers_are_encoded_as_starlette_encodes_json(content: Any, status: int) -> None:
    """The signing routes send their JSON without JSONResponse (send_json); the bytes and
    headers must stay what JSONResponse would give, as every other route answers."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(send_json(send, status, content))
    expected = JSONResponse(content, status_code=status)
    start, body = sent
    assert start["status"] == status
    assert body["body"] == expected.body
    assert sorted(start["headers"]) == sorted(expected.raw_headers)


@given(
    secret=st.integers(min_value=1, max_value=CURVE_ORDER - 1),
    digest=st.binary(min_size=32, max_size=32),
)
def test_a_batch_writes_a_hash_signature_as_starlette_encodes_its_dict(
    secret: int, digest: bytes
) -> None:
    """A batch answer writes hash signatures out directly (signature_json): the same bytes
    as JSONResponse gives the signature's dict, whatever its leading zeros."""
    signature = sign_digest_with(coincurve.PrivateKey.from_int(secret), digest)
    expected = JSONResponse(signature_to_dict(signature)).body
    assert signature_json(signature).encode() == expected
    for r, s in ((1, 1), (2**255, 1), (1, CURVE_ORDER // 2)):  # shortest and longest numbers
        edge = RecoverableSignature(r, s, 3)
        assert signature_json(edge).encode() == JSONResponse(signature_to_dict(edge)).body
