"""The gatekeeper without HTTP: what it decodes, what it audits, and how it fails closed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from signd.audit import SealedAuditRecord, verify_chain
from signd.errors import IntegrityError, InvalidField
from signd.gate import (
    AuditTrail,
    GatePaths,
    GateRequest,
    PolicyDenied,
    SigningCall,
    SigningKind,
    Unauthenticated,
    load_mac_key,
)
from signd.gate.setup import dev_policy, write_dev_defaults
from signd.policy import Policy
from tests.gate.support import TOKEN, Gated, transaction


def bearer(token: str = TOKEN) -> GateRequest:
    return GateRequest("POST", "/rpc", b"{}", {"Authorization": f"Bearer {token}"})


def test_bearer_tokens_and_missing_credentials(gated: Gated) -> None:
    caller = gated.gatekeeper.authenticate(bearer())
    assert caller.client_id == "bridge"
    with pytest.raises(Unauthenticated, match="unknown bearer token"):
        gated.gatekeeper.authenticate(bearer("guess"))
    both = GateRequest(
        "POST", "/rpc", b"", {"authorization": f"Bearer {TOKEN}", "x-signd-signature": "AA=="}
    )
    with pytest.raises(Unauthenticated, match="not both"):
        gated.gatekeeper.authenticate(both)
    assert gated.last()["operation"] == "authenticate"


def test_a_request_digest_is_its_body_sha256_and_headers_match_in_any_case() -> None:
    request = GateRequest(
        "POST", "/rpc", b'{"id": 1}', {"X-Signd-Client": "alice", "x-signd-client": "bob"}
    )
    assert request.sha256 == hashlib.sha256(b'{"id": 1}').hexdigest()
    assert request.sha256 is request.sha256  # computed once
    assert request == GateRequest("POST", "/rpc", b'{"id": 1}', request.headers)
    assert request.header("X-SIGND-CLIENT") == "alice"  # the first of that name
    assert request.header("authorization") is None


def test_the_intent_comes_from_the_decoded_transaction(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    caller = gated.gatekeeper.authenticate(bearer())
    other_from = transaction() | {"from": "0x" + "11" * 20}
    renamed = transaction(to=None) | {"to": None}
    outcomes = gated.gatekeeper.sign(
        caller,
        [
            SigningCall(SigningKind.ETH_TRANSACTION, hot_key["address"], other_from),
            SigningCall(SigningKind.ETH_TRANSACTION, hot_key["address"], renamed),
        ],
    )
    assert isinstance(outcomes[0], InvalidField) and outcomes[0].field == "from"
    assert isinstance(outcomes[1], PolicyDenied)
    assert "contract creation is not allowed" in outcomes[1].message
    records = [r.record for r in gated.records()[-2:]]
    assert [r.decision for r in records] == ["refused", "refused"]
    assert records[1].rule == "hot-eth"


class FailingStore:
    """Wraps a log; refuses appends while ``failing``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failing = True

    def append(self, sealed: SealedAuditRecord) -> None:
        self.append_many([sealed])

    def append_many(self, sealed: Sequence[SealedAuditRecord]) -> None:
        if self.failing:
            raise IntegrityError("disk full")
        self.inner.append_many(sealed)

    def last_hash(self) -> bytes:
        return bytes(self.inner.last_hash())

    def last_record(self) -> SealedAuditRecord | None:
        return self.inner.last_record()  # type: ignore[no-any-return]

    def records(self) -> Any:
        return self.inner.records()


def test_no_signature_leaves_without_its_audit_record(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    trail = gated.gatekeeper.audit
    store = FailingStore(trail.store)
    mac_key = load_mac_key(gated.paths.audit_key_file)
    gated.gatekeeper.audit = AuditTrail(mac_key, "test-node", store)
    caller = gated.gatekeeper.authenticate(bearer())
    call = SigningCall(SigningKind.ETH_MESSAGE, hot_key["address"], b"m")
    [withheld] = gated.gatekeeper.sign(caller, [call])
    assert isinstance(withheld, IntegrityError)
    store.failing = False
    [signed] = gated.gatekeeper.sign(caller, [call])
    assert not isinstance(signed, Exception)
    report = verify_chain(gated.records(), mac_key)
    assert report.ok, report.problems  # the chain continues where the log ends
    trail.close()


def test_keys_created_are_audited_one_record_each(gated: Gated) -> None:
    caller = gated.gatekeeper.authenticate(bearer())
    with pytest.raises(Exception, match="lacks scope keys:create"):
        gated.gatekeeper.create_keys(
            caller, chain="ethereum", custody="keystore", count=1, labels=["hot"]
        )
    response = gated.signed(
        "POST",
        "/v1/keys",
        {"chain": "ethereum", "custody": "keystore", "count": 3, "labels": ["hot"]},
    )
    keys = response.json()["keys"]
    records = [asdict(r.record) for r in gated.records()[-3:]]
    assert [r["key_id"] for r in records] == [k["key_id"] for k in keys]
    assert {(r["operation"], r["decision"], r["rule"]) for r in records} == {
        ("keys:create", "allowed", "hot-keys")
    }


def test_first_run_writes_a_loud_development_setup(tmp_path: Path) -> None:
    paths = GatePaths.under(tmp_path)
    created = write_dev_defaults(tmp_path, paths)
    assert created is not None and created.client_id == "dev"
    assert created.private_key.stat().st_mode & 0o777 == 0o600
    assert "BLIND SIGNING" in paths.policy_file.read_text()
    policy = Policy.from_bytes(paths.policy_file.read_bytes())
    assert policy.rule("dev-blind") is not None
    assert policy.rule("dev-blind").clients == frozenset({"dev"})  # type: ignore[union-attr]
    assert write_dev_defaults(tmp_path, paths) is None  # never twice
    paths.policy_file.unlink()
    with pytest.raises(Exception, match="go together"):
        write_dev_defaults(tmp_path, paths)
    assert "chain_ids = [1, 11155111, 31337]" in dev_policy()


def test_contract_selectors_star_allows_any_call_and_stands_alone() -> None:
    from signd.errors import ConfigurationError
    from signd.policy import SigningIntent

    rule = '[[rules]]\nname = "r"\nclients = ["*"]\nkey_labels = ["*"]\n'
    rule += 'operations = ["sign:transaction"]\nchains = ["ethereum"]\n'
    policy = Policy.from_bytes(f'version = 1\n{rule}contract_selectors = ["*"]\n'.encode())
    intent = SigningIntent(
        "c", "k", [], "ethereum", "sign:transaction", chain_id=1, to=b"\x01" * 20,
        has_data=True, data_selector=None,
    )  # fmt: skip
    assert policy.rules[0].refusal(intent) is None
    with pytest.raises(ConfigurationError, match="cannot be mixed"):
        Policy.from_bytes(f'version = 1\n{rule}contract_selectors = ["*", "0xa9059cbb"]\n'.encode())
