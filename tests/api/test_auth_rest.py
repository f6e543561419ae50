"""Authentication, scope, policy and audit over REST and JSON-RPC, through the gatekeeper."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from signd.api import ApiSettings
from signd.api.openapi import openapi_document
from signd.auth import sign_request
from tests.api import samples
from tests.gate.support import (
    BOTH_GATES,
    OTHER,
    TOKEN,
    TRANSFER,
    Gated,
    assert_log_verifies,
    open_gated,
    operator_key,
    transaction,
)

pytestmark = BOTH_GATES

SIGN_TX = "/v1/sign/ethereum/transaction"


def refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


def body(key: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"key": key["address"], "transaction": transaction(**options)}


def test_an_allowed_transaction_is_signed_and_audited(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    response = gated.signed("POST", SIGN_TX, body(hot_key))
    assert response.status_code == 200, response.text
    raw = response.json()["raw_transaction"]
    assert samples.transaction_signer(raw) == hot_key["address"]
    record = gated.last()
    assert record["decision"] == "allowed"
    assert (record["client_id"], record["rule"], record["key_id"]) == (
        "alice",
        "hot-eth",
        hot_key["key_id"],
    )
    assert record["operation"] == "sign:transaction"
    assert record["result_sha256"] == samples_sha256(raw)


def samples_sha256(raw_hex: str) -> str:
    import hashlib

    return hashlib.sha256(bytes.fromhex(raw_hex.removeprefix("0x"))).hexdigest()


def test_unsigned_wrongly_signed_expired_and_replayed_requests_get_401_and_are_audited(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    payload = body(hot_key)
    before = len(gated.records())
    unsigned = gated.client.post(SIGN_TX, json=payload)
    wrong_key = gated.signed("POST", SIGN_TX, payload, key=gated.reader)
    expired = gated.signed("POST", SIGN_TX, payload, now=time.time() - 3600)
    content = json.dumps(payload).encode()
    headers = sign_request("POST", SIGN_TX, content, "alice", gated.alice)
    first = gated.signed("POST", SIGN_TX, payload, headers=headers)
    replayed = gated.signed("POST", SIGN_TX, payload, headers=headers)
    tampered = gated.client.post(
        SIGN_TX,
        content=content.replace(b"0x3535", b"0x3636"),
        headers={**headers, "content-type": "application/json"},
    )

    assert first.status_code == 200
    messages = [
        refused(r, 401, "unauthenticated")["message"]
        for r in (unsigned, wrong_key, expired, replayed, tampered)
    ]
    assert "no credentials" in messages[0]
    assert "does not verify" in messages[1]
    assert "stale timestamp" in messages[2]
    assert "replayed" in messages[3]
    assert "does not verify" in messages[4]
    records = [r.record for r in gated.records()[before:]]
    refusals = [r for r in records if r.decision == "refused"]
    assert len(refusals) == 5
    assert all(r.operation == "authenticate" and r.client_id is None for r in refusals)
    assert all(SIGN_TX in r.reason for r in refusals)


def test_out_of_scope_and_foreign_labels_get_403_and_are_audited(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    by_reader = gated.signed("POST", SIGN_TX, body(hot_key), as_client="reader")
    error = refused(by_reader, 403, "out_of_scope")
    assert "lacks scope sign:transaction" in error["message"]
    assert gated.last()["decision"] == "refused"
    assert gated.last()["client_id"] == "reader"

    cold = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": "keystore", "labels": ["cold"]}
    )
    assert "may not create keys labelled ['cold']" in refused(cold, 403, "out_of_scope")["message"]
    assert gated.last()["operation"] == "keys:create"
    assert gated.last()["decision"] == "refused"

    unlabelled = gated.signer.create_keys(chain="ethereum", custody="keystore")[0]
    foreign = gated.signed(
        "POST", SIGN_TX, {"key": unlabelled.address, "transaction": transaction()}
    )
    assert "may not use this key" in refused(foreign, 403, "out_of_scope")["message"]
    assert gated.last()["key_id"] == unlabelled.key_id


def test_a_key_of_other_labels_is_not_described_to_a_client_refused_it(gated: Gated) -> None:
    """A client restricted to some labels learns nothing of a key with none of them, by
    whichever form of its address or its key id it asks, reading or signing: the refusal
    names neither the key's id nor its labels (the audit record, for operators, names the
    key). Nor does any listing of that label show it."""
    label = "treasury-cold-7"
    key = gated.signer.create_keys(chain="ethereum", custody="keystore", labels=[label])[0]
    checksum = key.address
    refs = [checksum, checksum.lower(), "0x" + checksum[2:].upper(), key.key_id]
    for ref in refs:
        for response in (
            gated.signed("GET", f"/v1/keys/{ref}"),
            gated.signed("POST", SIGN_TX, {"key": ref, "transaction": transaction()}),
        ):
            refused(response, 403, "out_of_scope")
            assert key.key_id not in response.text and label not in response.text
    assert gated.last()["key_id"] == key.key_id
    for query in (f"?label={label}&limit=1000", "?limit=1000", "?chain=ethereum&limit=1000"):
        listed = gated.signed("GET", "/v1/keys" + query)
        assert listed.status_code == 200, listed.text
        assert key.key_id not in listed.text and label not in listed.text


def test_policy_refusals_name_the_rule(gated: Gated, hot_key: dict[str, Any]) -> None:
    cases = {
        "chain id 5 is not in chain_ids": body(hot_key, chain_id=5),
        f"destination {OTHER} is not in to_allowlist": body(hot_key, to=OTHER),
        "exceeds max_value_per_tx": body(hot_key, value=2 * 10**18),
        "selector 0x095ea7b3 is not in contract_selectors": body(
            hot_key, data="0x095ea7b3" + "00" * 64
        ),
        "contract creation is not allowed": body(hot_key, to=None, data="0x6000"),
    }
    for reason, request in cases.items():
        error = refused(gated.signed("POST", SIGN_TX, request), 403, "policy_denied")
        assert error["rule"] == "hot-eth"
        assert reason in error["message"]
        record = gated.last()
        assert (record["decision"], record["rule"]) == ("refused", "hot-eth")
        assert reason in record["reason"]
    allowed = gated.signed("POST", SIGN_TX, body(hot_key, data=TRANSFER + "00" * 64))
    assert allowed.status_code == 200


def test_the_spend_window_is_charged_only_for_signed_transactions(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    for nonce in range(3):
        ok = gated.signed("POST", SIGN_TX, body(hot_key, value=10**18, nonce=nonce))
        assert ok.status_code == 200, ok.text
    over = gated.signed("POST", SIGN_TX, body(hot_key, value=1, nonce=3))
    assert "exceeds max_value_per_window" in refused(over, 403, "policy_denied")["message"]


def test_messages_hashes_and_typed_data_follow_the_policy(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    message = gated.signed(
        "POST", "/v1/sign/ethereum/message", {"key": hot_key["address"], "message": "hi"}
    )
    assert samples.text_signer("hi", message.json()["signature"]) == hot_key["address"]
    blind = gated.signed(
        "POST", "/v1/sign/hash", {"key": hot_key["address"], "hash": "0x" + "11" * 32}
    )
    error = refused(blind, 403, "policy_denied")
    assert "no rule covers client 'alice'" in error["message"] and "rule" not in error
    typed = gated.signed(
        "POST",
        "/v1/sign/ethereum/typed-data",
        {"key": hot_key["address"], "typed_data": samples.MAIL},
    )
    assert "for sign:typed_data" in refused(typed, 403, "policy_denied")["message"]


def test_a_batch_is_authenticated_once_and_each_item_decided_and_audited(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    before = len(gated.records())
    items = [
        {"type": "ethereum/transaction", **body(hot_key)},
        {"type": "ethereum/transaction", **body(hot_key, chain_id=5)},
        {"type": "ethereum/message", "key": hot_key["address"], "message": "m"},
    ]
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    results = response.json()["results"]
    assert "raw_transaction" in results[0]
    assert results[1]["error"]["code"] == "policy_denied"
    assert results[1]["error"]["rule"] == "hot-eth"
    assert "signature" in results[2]
    decisions = [r.record.decision for r in gated.records()[before:]]
    assert decisions == ["allowed", "refused", "allowed"]


def test_key_reads_need_the_scope_and_show_only_usable_keys(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    custody = hot_key["custody"]
    operator_key(gated.signer, gated.paths.audit_log.parent, custody, ["cold"])
    mine = gated.signed("GET", f"/v1/keys?custody={custody}").json()["keys"]
    assert [k["key_id"] for k in mine] == [hot_key["key_id"]]
    everyone = gated.signed("GET", f"/v1/keys?custody={custody}", as_client="reader").json()["keys"]
    assert len(everyone) == 2
    assert gated.signed("GET", f"/v1/keys/{hot_key['address']}").status_code == 200
    assert gated.client.get(f"/v1/keys/{hot_key['address']}").status_code == 401
    assert gated.client.get("/healthz").status_code == 200  # probes stay public


def rpc(gated: Gated, method: str, params: list[Any], token: str | None = TOKEN) -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    return gated.client.post("/rpc", json=request, headers=headers)


def test_json_rpc_with_a_bearer_token(gated: Gated, hot_key: dict[str, Any]) -> None:
    tx = transaction() | {"from": hot_key["address"]}
    signed = rpc(gated, "eth_signTransaction", [tx])
    assert samples.transaction_signer(signed.json()["result"]["raw"]) == hot_key["address"]
    assert gated.last()["client_id"] == "bridge"

    denied = rpc(gated, "eth_signTransaction", [tx | {"to": OTHER}]).json()["error"]
    assert denied["code"] == -32003
    assert denied["data"] == {"code": "policy_denied", "rule": "hot-eth"}

    for token in (None, "wrong-token"):
        answer = rpc(gated, "eth_signTransaction", [tx], token=token)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == -32010
        assert answer.json()["error"]["data"]["code"] == "unauthenticated"
    assert gated.last()["operation"] == "authenticate"
    assert TOKEN not in gated.paths.audit_log.read_text()


def test_credentials_given_twice_or_both_ways_are_refused_and_audited(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """A proxy in front may read the first of two headers where signd would read the last:
    a credential header given twice is refused, whatever the order, as is a bearer token with
    any request-signature header."""
    tx = transaction() | {"from": hot_key["address"]}
    content = (
        __import__("json")
        .dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_signTransaction", "params": [tx]})
        .encode()
    )
    good, bad = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer nope")
    signed = sign_request("POST", "/rpc", content, "alice", gated.alice)
    attempts = [
        [bad, good],
        [good, bad],
        [good, ("x-signd-client", "alice")],
        [*signed.items(), ("x-signd-signature", signed["X-Signd-Signature"])],
    ]
    before = len(gated.records())
    for headers in attempts:
        answer = gated.client.post("/rpc", content=content, headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["error"]["data"]["code"] == "unauthenticated"
    refusals = [record.record for record in gated.records()[before:]]
    assert [(r.operation, r.decision) for r in refusals] == [("authenticate", "refused")] * 4
    assert "not both" in refusals[2].reason


def test_a_query_string_on_a_post_route_is_refused_with_the_reason(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """The same answer whichever gate reads the request (the enclave's reading refuses it;
    the host's used to ignore it and sign)."""
    message = {"key": hot_key["address"], "message": "hi"}
    for path, content in [
        ("/v1/sign/ethereum/message", message),
        ("/v1/sign/batch", {"requests": [{"type": "ethereum/message", **message}]}),
        ("/v1/keys", {"chain": "ethereum", "custody": "keystore"}),
        ("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}),
    ]:
        answer = gated.signed("POST", path + "?apikey=x", content)
        assert answer.status_code == 400, answer.text
        assert f"POST {path}: this route takes no query string" in answer.text


@pytest.mark.parametrize("path", ["/", "/rpc"])
def test_a_query_string_on_json_rpc_is_an_invalid_request(gated: Gated, path: str) -> None:
    """The HTTP request is refused as a whole, before any JSON-RPC request was read from it:
    -32600 invalid request (no params were read to be invalid), with its HTTP 400."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    answer = gated.signed("POST", path + "?x=1", call)
    assert answer.status_code == 400, answer.text
    assert answer.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32600,
            "message": f"POST {path}: this route takes no query string",
            "data": {"code": "invalid_request"},
        },
    }


def test_oversized_credentials_and_targets_get_their_own_status(gated: Gated) -> None:
    """What no credential or route can be is refused before authentication, the same with
    either gate (the enclave's message format would refuse it with a message about itself)."""
    long_token = {"authorization": "Bearer " + "t" * 5000}
    many = {f"x-signd-extra-{n}": "x" for n in range(40)}
    for headers in (long_token, many):
        answer = gated.client.get("/v1/keys", headers=headers)
        refused(answer, 431, "headers_too_large")
        rpc_answer = gated.client.post("/rpc", json={"jsonrpc": "2.0"}, headers=headers)
        assert rpc_answer.status_code == 431, rpc_answer.text
        assert rpc_answer.json()["error"]["data"]["code"] == "headers_too_large"
        assert rpc_answer.json()["error"]["code"] == -32600
    long_query = "/v1/keys?label=" + "a" * 9000
    refused(gated.signed("GET", long_query), 414, "uri_too_long")


def test_readyz_names_an_audit_log_that_takes_no_record_until_it_does(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write to the audit log fails and cannot be undone (the file refuses both, as with
    ``chattr +i``): nothing is released, /readyz says the audit log is why, and once the file
    takes writes again the service goes on without a restart."""
    real_fsync, real_ftruncate = os.fsync, os.ftruncate

    def refused(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "fsync", refused)
    monkeypatch.setattr(os, "ftruncate", refused)
    failed = gated.signed("POST", SIGN_TX, body(hot_key))
    assert failed.status_code == 503, failed.text
    assert "raw_transaction" not in failed.text
    ready = gated.client.get("/readyz")
    assert ready.status_code == 503
    [audit] = [part for part in ready.json()["parts"] if part["part"] == "audit"]
    assert audit["status"] == "unavailable" and "could not be undone" in audit["message"]

    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    assert gated.client.get("/readyz").status_code == 200
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 200
    assert_log_verifies(gated.gatekeeper, gated.paths)


def test_blind_signing_switched_off_is_refused_by_the_gate_and_audited(
    tmp_path: Path, gate_mode: str
) -> None:
    """``allow_blind_signing`` off: the gate refuses every raw hash, whoever asks and whatever
    the policy says, and seals the refusal (it used to be refused before the gate, unseen by
    the audit log); a batch's hash items are refused one by one."""
    with open_gated(tmp_path / "home", gate_mode, ApiSettings(allow_blind_signing=False)) as gated:
        custody = "enclave" if gate_mode == "enclave" else "keystore"
        body = {"chain": "ethereum", "custody": custody, "labels": ["hot"]}
        key = gated.signed("POST", "/v1/keys", body).json()["keys"][0]
        before = len(gated.records())
        blind = {"key": key["key_id"], "hash": "0x" + "11" * 32}
        refused(gated.signed("POST", "/v1/sign/hash", blind), 403, "blind_signing_disabled")
        batch = {"requests": [{"type": "hash", **blind}, {"type": "hash", **blind}]}
        answer = gated.signed("POST", "/v1/sign/batch", batch)
        assert answer.status_code == 200, answer.text
        codes = [result["error"]["code"] for result in answer.json()["results"]]
        assert codes == ["blind_signing_disabled"] * 2
        records = [sealed.record for sealed in gated.records()[before:]]
        assert [(r.operation, r.decision) for r in records] == [("sign:hash", "refused")] * 3
        assert all("blind signing" in r.reason for r in records)
        assert_log_verifies(gated.gatekeeper, gated.paths)


def test_a_reload_takes_effect_and_a_bad_file_keeps_the_old_policy(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    policy = gated.paths.policy_file
    good = policy.read_text()
    policy.write_text(good.replace("chain_ids = [1, 11155111]", "chain_ids = [11155111]"))
    assert gated.gatekeeper.reload() is None
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 403

    policy.write_text("version = 1\n[[rules]]\nname = 'broken'\n")
    refusal = gated.gatekeeper.reload()
    assert refusal is not None and refusal.files == ("policy",), refusal
    still = gated.signed("POST", SIGN_TX, body(hot_key))
    assert "chain id 1 is not in chain_ids [11155111]" in still.json()["error"]["message"]
    assert gated.signed("POST", SIGN_TX, body(hot_key, chain_id=11155111)).status_code == 200


def test_the_document_says_which_operations_need_credentials_and_they_answer_401_without(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """Every operation the OpenAPI document secures refuses a request without credentials
    with a 401 it documents; the public ones (probes, the document, attestation) answer."""
    document = openapi_document()
    assert set(document["components"]["securitySchemes"]) == {"bearerToken", "requestSignature"}
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            security = operation.get("security", document["security"])
            url = path.replace("{key}", hot_key["key_id"])
            if path == "/v1/attestation":
                url += "?nonce=00"
            response = gated.client.request(
                method.upper(), url, json={} if method == "post" else None
            )
            if not security:
                assert response.status_code != 401, (method, path)
                continue
            assert response.status_code == 401, (method, path, response.text)
            assert "401" in operation["responses"], (method, path)
            answer = response.json()
            code = answer["error"]["data"]["code"] if path in ("/", "/rpc") else None
            assert (code or answer["error"]["code"]) == "unauthenticated"
            checked += 1
    assert checked == 10  # three key operations, five signing routes, JSON-RPC at / and /rpc
