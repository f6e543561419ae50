"""A request's signatures that are one decision (hash and message items with the same key
under the same rule) are one audit record naming each result; everything else keeps a
record of its own. Through both gates."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from signd.api import ApiSettings
from signd.api.enclave_gatekeeper import VERIFY_CHUNK, line_chunks
from signd.audit import AuditRecord, AuditSigner
from signd.audit.records import Spend
from signd.auth import Principal
from signd.crypto.secp256k1 import PARALLEL_MIN
from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo, utc_now
from signd.enclave.gate import MAX_LINE_SIZE
from signd.enclave.signer import ProvenKey
from signd.errors import AccessDenied
from signd.gate import PolicyDenied, SigningCall, SigningKind, keeper
from signd.gate.audit import MAX_GROUPED_RESULTS, MAX_REASON, DecisionLog
from signd.gate.keeper import Decided, Gatekeeper, approve
from signd.policy import Policy, PolicyEngine
from tests.api.samples import text_signer
from tests.gate.support import (
    BOTH_GATES,
    GATE_MODES,
    POLICY,
    Gated,
    assert_log_verifies,
    open_gated,
    transaction,
)


def to_checksum(address: str) -> str:
    return str(Web3.to_checksum_address(address))


def digest_of(answer: dict[str, Any]) -> str:
    """The SHA-256 the audit record gives a result: of the signature or raw transaction."""
    hex_result = answer.get("raw_transaction") or answer["signature"]
    return hashlib.sha256(bytes.fromhex(hex_result[2:])).hexdigest()


def message(key: dict[str, Any], text: str) -> dict[str, Any]:
    return {"type": "ethereum/message", "key": key["address"], "message": text}


def blind(key: dict[str, Any]) -> dict[str, Any]:
    return {"type": "hash", "key": key["key_id"], "hash": "0x" + "ab" * 32}


@BOTH_GATES
def test_one_record_per_decision_naming_every_signature(
    gated: Gated, hot_key: dict[str, Any], gate_mode: str
) -> None:
    custody = "enclave" if gate_mode == "enclave" else "keystore"
    made = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": custody, "labels": ["hot"]}
    )
    other = made.json()["keys"][0]
    items = [
        message(hot_key, "a0"),
        message(other, "b0"),
        {"type": "ethereum/transaction", "key": hot_key["address"], "transaction": transaction()},
        message(hot_key, "a1"),
        {
            "type": "ethereum/transaction",
            "key": hot_key["address"],
            "transaction": transaction(chain_id=5, nonce=1),
        },
        blind(hot_key),  # no rule allows alice blind signing
        message(hot_key, "a2"),
        blind(hot_key),
    ]
    before = len(gated.records())
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [("error" in result) for result in results] == [0, 0, 0, 0, 1, 1, 0, 1]

    records = [sealed.record for sealed in gated.records()[before:]]
    allowed = [r for r in records if r.decision == "allowed"]
    refused = [r for r in records if r.decision == "refused"]
    assert len(records) == 6  # not 8: the three messages with hot_key are one decision
    [grouped] = [r for r in allowed if r.results_sha256 is not None]
    assert (grouped.operation, grouped.key_id, grouped.rule) == (
        "sign:message",
        hot_key["key_id"],
        "hot-messages",
    )
    assert grouped.result_sha256 is None
    assert grouped.results_sha256 == tuple(digest_of(results[i]) for i in (0, 3, 6))

    def single(operation: str, key: dict[str, Any]) -> AuditRecord:
        [record] = [
            r
            for r in allowed
            if (r.operation, r.key_id, r.results_sha256) == (operation, key["key_id"], None)
        ]
        return record

    assert single("sign:message", other).result_sha256 == digest_of(results[1])
    assert single("sign:transaction", hot_key).result_sha256 == digest_of(results[2])
    assert sorted((r.operation, r.rule) for r in refused) == [
        ("sign:hash", None),
        ("sign:hash", None),
        ("sign:transaction", "hot-eth"),
    ]
    assert all(r.request_sha256 == records[0].request_sha256 for r in records)
    assert_log_verifies(gated.gatekeeper, gated.paths)


@BOTH_GATES
def test_a_large_batch_is_signed_on_every_core_and_audited_signature_by_signature(
    tmp_path: Path, gate_mode: str
) -> None:
    """Past :data:`PARALLEL_MIN` calls, the gate signs a key's hash and message calls
    together, on every core, after deciding on each in order: each answer is its own key's
    signature of its own payload, each record lists its results in request order, and the
    refused calls in between keep their records."""
    custody = "enclave" if gate_mode == "enclave" else "keystore"
    settings = ApiSettings(allow_blind_signing=True, max_batch=1000)
    with open_gated(tmp_path / "home", gate_mode, settings) as gated:
        made = gated.signed(
            "POST",
            "/v1/keys",
            {"chain": "ethereum", "custody": custody, "labels": ["hot"], "count": 3},
        )
        keys = made.json()["keys"]
        items = [message(keys[n % 3], f"m{n}") for n in range(3 * PARALLEL_MIN)]
        items[5] = message({"address": "0x" + "00" * 20}, "nobody's")  # no such key
        items[7] = blind(keys[1])  # no rule lets alice sign a bare hash
        before = len(gated.records())
        response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        failed = [n for n, result in enumerate(results) if "error" in result]
        assert failed == [5, 7]
        for n, (item, result) in enumerate(zip(items, results, strict=True)):
            if n not in failed:
                assert text_signer(item["message"], result["signature"]) == to_checksum(
                    keys[n % 3]["address"]
                )
        records = [sealed.record for sealed in gated.records()[before:]]
        for k, key in enumerate(keys):
            [record] = [r for r in records if r.decision == "allowed" and r.key_id == key["key_id"]]
            assert record.results_sha256 == tuple(
                digest_of(results[n]) for n in range(len(items)) if n % 3 == k and n not in failed
            )
        assert sorted(r.operation for r in records if r.decision == "refused") == [
            "sign:hash",
            "sign:message",
        ]
        assert_log_verifies(gated.gatekeeper, gated.paths)


def _sign_again_refused(
    gated: Gated, items: list[dict[str, Any]]
) -> tuple[set[str], list[AuditRecord]]:
    """Sign ``items`` as a batch whose every item is refused: the error codes, and the records
    it added (one per item)."""
    before = len(gated.records())
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    assert response.status_code == 200, response.text
    codes = {result["error"]["code"] for result in response.json()["results"]}
    records = [sealed.record for sealed in gated.records()[before:]]
    assert len(records) == len(items)
    return codes, records


@pytest.mark.parametrize("gate_mode", [GATE_MODES[0]], indirect=True)
def test_a_reload_before_a_large_batch_is_signed_refuses_each_of_its_calls(
    tmp_path: Path, gate_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls left to sign together are committed together, first: a policy reloaded
    since their decision refuses every one of them, each with a record of its own."""
    settings = ApiSettings(max_batch=1000)
    with open_gated(tmp_path / "home", gate_mode, settings) as gated:
        made = gated.signed(
            "POST", "/v1/keys", {"chain": "ethereum", "custody": "keystore", "labels": ["hot"]}
        )
        [key] = made.json()["keys"]
        items = [message(key, f"m{n}") for n in range(PARALLEL_MIN)]
        assert gated.signed("POST", "/v1/sign/batch", {"requests": items}).status_code == 200

        def reloaded(decision: object, intent: object) -> None:
            raise AccessDenied("the policy was reloaded while signing; retry the request")

        assert isinstance(gated.gatekeeper, Gatekeeper)
        monkeypatch.setattr(gated.gatekeeper.engine, "commit", reloaded)
        codes, records = _sign_again_refused(gated, items)
        assert codes == {"policy_denied"}
        assert {(r.decision, r.rule, r.key_id) for r in records} == {
            ("refused", "hot-messages", key["key_id"])
        }
        assert all(r.result_sha256 is None and r.results_sha256 is None for r in records)
        assert_log_verifies(gated.gatekeeper, gated.paths)


@pytest.mark.parametrize("gate_mode", [GATE_MODES[0]], indirect=True)
def test_a_signing_fault_refuses_each_waiting_call_and_leaves_no_placeholder(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [message(hot_key, f"m{n}") for n in range(PARALLEL_MIN)]
    assert gated.signed("POST", "/v1/sign/batch", {"requests": items}).status_code == 200

    def broken(pairs: object) -> None:
        raise ValueError("the library failed")

    monkeypatch.setattr(gated.signer, "sign_hashes", broken)
    codes, records = _sign_again_refused(gated, items)
    assert codes == {"integrity_error"}
    assert {(r.decision, r.reason) for r in records} == {("refused", "signing failed (ValueError)")}
    assert "pending:" not in gated.paths.audit_log.read_text()
    assert_log_verifies(gated.gatekeeper, gated.paths)


@BOTH_GATES
def test_a_signing_fault_in_one_call_is_refused_on_the_record_and_spares_the_others(
    gated: Gated, hot_key: dict[str, Any], gate_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the signing library that is not a signd error (here at the second
    signature) refuses its call as ``integrity_error`` with a record of its own; the calls
    around it are signed and recorded as usual, and a request of that call alone gets the
    same error."""
    made: list[object] = []

    def failing_second(sign: Callable[..., Any]) -> Callable[..., Any]:
        def sign_or_fail(*args: Any) -> Any:
            made.append(args)
            if len(made) == 2:
                raise ValueError("the library failed")
            return sign(*args)

        return sign_or_fail

    if gate_mode == "enclave":  # the enclave signs the keys it seals
        monkeypatch.setattr(ProvenKey, "sign_digest", failing_second(ProvenKey.sign_digest))
    else:
        monkeypatch.setattr(gated.signer, "sign_hash", failing_second(gated.signer.sign_hash))
    items = [message(hot_key, f"m{n}") for n in range(3)]
    before = len(gated.records())
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result.get("error", {}).get("code") for result in results] == [
        None,
        "integrity_error",
        None,
    ]
    records = [sealed.record for sealed in gated.records()[before:]]
    [allowed] = [r for r in records if r.decision == "allowed"]
    [refused] = [r for r in records if r.decision == "refused"]
    assert allowed.results_sha256 == (digest_of(results[0]), digest_of(results[2]))
    assert (refused.reason, refused.rule, refused.key_id) == (
        "signing failed (ValueError)",
        "hot-messages",
        hot_key["key_id"],
    )

    made.clear()
    assert gated.signed("POST", "/v1/sign/batch", {"requests": items[:1]}).status_code == 200
    alone = gated.signed(
        "POST", "/v1/sign/ethereum/message", {"key": hot_key["key_id"], "message": "m1"}
    )
    assert (alone.status_code, alone.json()["error"]["code"]) == (500, "integrity_error")
    assert gated.records()[-1].record.reason == "signing failed (ValueError)"
    assert_log_verifies(gated.gatekeeper, gated.paths)


def _batch_in_threads(
    gated: Gated,
    hot_key: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    in_thread: Callable[[Callable[..., Any], Any, Any], Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """26 messages signed in threads, 7 calls to a thread; each thread's call to the gate
    goes through ``in_thread(sign, caller, calls)``. The items and their results."""
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, Gatekeeper)
    sign = gatekeeper.sign
    monkeypatch.setattr(keeper, "THREAD_CHUNK", 7)
    monkeypatch.setattr(gatekeeper, "signs_inline", lambda calls: False)
    monkeypatch.setattr(gatekeeper, "sign", lambda caller, calls: in_thread(sign, caller, calls))
    items = [message(hot_key, f"item {n}") for n in range(26)]
    response = gated.signed("POST", "/v1/sign/batch", {"requests": items})
    assert response.status_code == 200, response.text
    return items, response.json()["results"]


@pytest.mark.parametrize("gate_mode", [GATE_MODES[0]], indirect=True)
def test_a_batch_signed_in_threads_goes_in_chunks_and_keeps_its_order(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys that cannot sign on the event loop (not yet in memory, or on a device) sign in
    threads, THREAD_CHUNK calls each, all at once; the answers keep the request's order."""
    chunks: list[int] = []

    def counted(sign: Callable[..., Any], caller: Any, calls: Any) -> Any:
        chunks.append(len(calls))
        return sign(caller, calls)

    items, results = _batch_in_threads(gated, hot_key, monkeypatch, counted)
    assert sorted(chunks) == [5, 7, 7, 7]  # the threads start in any order
    signers = {
        text_signer(item["message"], result["signature"])
        for item, result in zip(items, results, strict=True)
    }
    assert signers == {to_checksum(hot_key["address"])}


@pytest.mark.parametrize("gate_mode", [GATE_MODES[0]], indirect=True)
def test_a_chunk_that_fails_in_its_thread_loses_only_its_own_results(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_short_chunks(sign: Callable[..., Any], caller: Any, calls: Any) -> Any:
        if len(calls) < 7:
            raise RuntimeError("this thread failed")
        return sign(caller, calls)

    _, results = _batch_in_threads(gated, hot_key, monkeypatch, failing_short_chunks)
    assert ["error" in result for result in results] == [False] * 21 + [True] * 5
    assert {result["error"]["code"] for result in results[21:]} == {"internal_error"}


@BOTH_GATES
def test_one_message_keeps_its_result_in_result_sha256(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    response = gated.signed("POST", "/v1/sign/batch", {"requests": [message(hot_key, "only")]})
    [result] = response.json()["results"]
    record = gated.records()[-1].record
    assert (record.result_sha256, record.results_sha256) == (digest_of(result), None)
    assert "results_sha256" not in gated.paths.audit_log.read_text().splitlines()[-1]


def _signed(log: DecisionLog, operation: str, key: str, result: str, **changes: Any) -> None:
    base = {"operation": operation, "client_id": "c", "chain": "ethereum", "key_id": key}
    fields: dict[str, Any] = {"reason": "allowed by rule r", "rule": "r", "spend": None}
    log.signed(base, result_sha256=result, **(fields | changes))


def test_only_the_same_decision_shares_a_record() -> None:
    log = DecisionLog()
    _signed(log, "sign:hash", "k1", "a")
    _signed(log, "sign:hash", "k2", "b")  # another key
    _signed(log, "sign:message", "k1", "c")  # another operation
    _signed(log, "sign:hash", "k1", "d", rule="s", reason="allowed by rule s")
    _signed(log, "sign:hash", "k1", "e", spend=Spend("r", "k1", 5))  # counted: its own
    _signed(log, "sign:transaction", "k1", "f")  # the policy read its fields
    _signed(log, "sign:transaction", "k1", "g")
    log.append({"operation": "sign:hash", "decision": "refused", "reason": "no"})
    _signed(log, "sign:hash", "k1", "h")
    _signed(log, "sign:hash", "k1", "i")
    _signed(log, "sign:message", "k1", "j")
    shown = [(e.get("result_sha256"), e.get("results_sha256")) for e in log.entries]
    assert shown == [
        (None, ["a", "h", "i"]),
        ("b", None),
        (None, ["c", "j"]),
        ("d", None),
        ("e", None),
        ("f", None),
        ("g", None),
        (None, None),
    ]
    assert len(log.entries) == 8


def _later(log: DecisionLog, operation: str, key: str, **changes: Any) -> str:
    base = {"operation": operation, "client_id": "c", "chain": "ethereum", "key_id": key}
    fields: dict[str, Any] = {"reason": "allowed by rule r", "rule": "r"}
    return log.signed_later(base, **(fields | changes))


def test_signatures_made_later_keep_their_places() -> None:
    """A place taken for a signature not yet made is in decision order, grouped as a made
    one would be; settling fills in each result where its token was."""
    log = DecisionLog()
    a1 = _later(log, "sign:hash", "k1")
    b1 = _later(log, "sign:hash", "k2")
    log.append({"operation": "sign:hash", "decision": "refused", "reason": "no"})
    a2 = _later(log, "sign:hash", "k1")
    _signed(log, "sign:hash", "k1", "made-now")
    a3 = _later(log, "sign:hash", "k1")
    c1 = _later(log, "sign:message", "k1")
    tokens = [a1, b1, a2, a3, c1]
    assert len(set(tokens)) == len(tokens)
    log.settle({token: f"sha-{token}" for token in tokens})
    shown = [(e.get("result_sha256"), e.get("results_sha256")) for e in log.entries]
    assert shown == [
        (None, [f"sha-{a1}", f"sha-{a2}", "made-now", f"sha-{a3}"]),
        (f"sha-{b1}", None),
        (None, None),
        (f"sha-{c1}", None),
    ]


def test_a_signature_that_fails_later_becomes_a_refusal() -> None:
    log = DecisionLog()
    a1, a2, a3 = (_later(log, "sign:hash", "k1") for _ in range(3))
    b1 = _later(log, "sign:hash", "k2")
    c1, c2 = _later(log, "sign:hash", "k3"), _later(log, "sign:hash", "k3")
    failure = PolicyDenied("the policy was reloaded while signing", rule="r")
    log.settle({a1: "sha-a1", a2: failure, a3: "sha-a3", b1: failure, c1: "sha-c1", c2: failure})
    shown = [
        (e["key_id"], e["decision"], e.get("result_sha256"), e.get("results_sha256"))
        for e in log.entries
    ]
    assert shown == [
        ("k1", "allowed", None, ["sha-a1", "sha-a3"]),
        ("k2", "refused", None, None),  # no result left: the refusal takes its place
        ("k3", "allowed", "sha-c1", None),  # one result left: no list
        ("k1", "refused", None, None),
        ("k3", "refused", None, None),
    ]
    refusals = [e for e in log.entries if e["decision"] == "refused"]
    assert all(e["reason"] == failure.message and e["rule"] == "r" for e in refusals)
    assert all("results_sha256" not in e for e in refusals)


def test_a_record_lists_at_most_max_grouped_results() -> None:
    log = DecisionLog()
    names = [f"{n:064x}" for n in range(2 * MAX_GROUPED_RESULTS + 88)]
    for name in names:
        _signed(log, "sign:hash", "k1", name)
    lists = [entry["results_sha256"] for entry in log.entries]
    assert [len(found) for found in lists] == [MAX_GROUPED_RESULTS, MAX_GROUPED_RESULTS, 88]
    assert [name for found in lists for name in found] == names


@pytest.mark.parametrize("gate_mode", [GATE_MODES[1]], indirect=True)
def test_a_log_of_large_records_verifies_in_the_enclave(tmp_path: Path, gate_mode: str) -> None:
    """Sixty records of 256 signatures each are over a megabyte: more than one frame to the
    enclave, which verifies them a chunk at a time."""
    settings = ApiSettings(allow_blind_signing=True, max_batch=MAX_GROUPED_RESULTS)
    with open_gated(tmp_path / "home", gate_mode, settings) as gated:
        made = gated.signed(
            "POST", "/v1/keys", {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
        )
        key = made.json()["keys"][0]
        items = [message(key, f"m{n}") for n in range(MAX_GROUPED_RESULTS)]
        for _ in range(60):
            answer = gated.signed("POST", "/v1/sign/batch", {"requests": items})
            assert answer.status_code == 200, answer.text
        log = gated.paths.audit_log.read_bytes()
        assert len(log) > 1 << 20
        assert assert_log_verifies(gated.gatekeeper, gated.paths) < VERIFY_CHUNK


def test_a_reused_decision_is_for_the_same_key_facts_only() -> None:
    """Within one gate call a decision is reused only for the same client, key id, chain
    and labels (a host describing one key id twice, with other labels, gets a decision of
    its own; so does another client's request gathered into the same call)."""
    engine = PolicyEngine(Policy.from_bytes(POLICY.encode()))  # hot-messages: label hot
    principal = Principal("alice", frozenset({"sign:message"}), frozenset({"*"}), "bearer")
    hot = KeyInfo("k1", "ethereum", "0x" + "11" * 20, b"\x02" * 33, "enclave", utc_now(), ("hot",))
    decided: Decided = {}
    call = SigningCall(SigningKind.ETH_MESSAGE, "k1", b"m")
    first = approve(principal, call, hot, engine, decided)
    again = approve(principal, call, hot, engine, decided)
    assert again.decision is first.decision and len(decided) == 1
    with pytest.raises(PolicyDenied):
        approve(principal, call, dataclasses.replace(hot, labels=("cold",)), engine, decided)
    mallory = dataclasses.replace(principal, client_id="mallory")  # no rule covers mallory
    with pytest.raises(PolicyDenied):
        approve(mallory, call, hot, engine, decided)


def test_line_chunks_keep_order_and_bounds() -> None:
    lines = ["a" * 10, "b" * 10, "c" * 25, "d" * 5, "e" * 5, "f" * 5]
    assert line_chunks(lines, 3, 20) == [lines[:2], [lines[2]], lines[3:]]  # c alone: too big
    assert line_chunks(lines, 2, 1000) == [lines[:2], lines[2:4], lines[4:]]
    assert line_chunks([], 3, 20) == [[]]


def test_a_full_record_fits_a_line_of_audit_tail() -> None:
    """The largest record the gate seals (256 results, the longest reason, escaped to six
    characters a character) is still a line the enclave takes back at start-up."""
    signer = AuditSigner(Secret(bytes(32)), "n" * 64)
    sealed = signer.seal(
        operation="sign:message",
        decision="allowed",
        reason="\u20ac" * MAX_REASON,
        client_id="c" * 64,
        key_id="k" * 64,
        chain="ethereum",
        rule="r" * 64,
        request_sha256="ab" * 32,
        results_sha256=["cd" * 32] * MAX_GROUPED_RESULTS,
    )
    assert len(sealed.to_json()) <= MAX_LINE_SIZE


@BOTH_GATES
def test_a_custodys_refusal_while_signing_is_its_own_error_not_the_policys(
    gated: Gated, hot_key: dict[str, Any], gate_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custody that refuses while signing (a device refusing its own credentials: an HSM
    PIN, a KMS grant) answers its own error, on the record as refused under the rule that
    allowed the request; only a refused spend commit is the policy's ``policy_denied``."""

    def refusing(*args: Any) -> Any:
        raise AccessDenied("the device refused its credentials")

    if gate_mode == "enclave":  # the enclave signs the keys it seals
        monkeypatch.setattr(ProvenKey, "sign_digest", refusing)
    else:
        monkeypatch.setattr(gated.signer, "sign_hash", refusing)
    response = gated.signed(
        "POST", "/v1/sign/ethereum/message", {"key": hot_key["key_id"], "message": "m"}
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"] == {
        "code": "access_denied",
        "message": "the device refused its credentials",
    }
    record = gated.records()[-1].record
    assert (record.decision, record.reason, record.rule) == (
        "refused",
        "the device refused its credentials",
        "hot-messages",
    )
    assert_log_verifies(gated.gatekeeper, gated.paths)
