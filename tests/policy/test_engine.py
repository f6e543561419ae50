"""Each constraint allows and refuses, and a refusal names the rule that refused."""

from __future__ import annotations

from typing import Any

import pytest

from signd.errors import AccessDenied
from signd.policy import Decision, Policy, PolicyEngine, SigningIntent
from tests.policy.conftest import (
    ALICE,
    APPROVE,
    BOB,
    ETHER,
    TRANSFER,
    USDC,
    hot_tx,
)


def refusal(engine: PolicyEngine, intent: SigningIntent) -> str:
    decision = engine.check(intent)
    assert decision.refused and not decision.allowed
    return decision.reason


def assert_allowed(engine: PolicyEngine, intent: SigningIntent, rule: str) -> Decision:
    decision = engine.check(intent)
    assert decision.allowed, decision.reason
    assert decision.rule == rule
    assert decision.reason == f"allowed by rule {rule}"
    decision.raise_if_refused()
    return decision


def test_the_baseline_transaction_is_allowed(engine: PolicyEngine, policy: Policy) -> None:
    decision = assert_allowed(engine, hot_tx(), "hot-eth")
    assert decision.policy_sha256 == policy.sha256


def test_chain_ids(engine: PolicyEngine) -> None:
    assert refusal(engine, hot_tx(chain_id=5)) == "rule hot-eth: chain id 5 is not in chain_ids [1]"
    assert "without a chain id (no EIP-155)" in refusal(engine, hot_tx(chain_id=None))


def test_destination_allowlist(engine: PolicyEngine) -> None:
    assert_allowed(engine, hot_tx(to=USDC, value=0), "hot-eth")
    assert refusal(engine, hot_tx(to=BOB)) == (
        "rule hot-eth: destination 0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359 "
        "is not in to_allowlist"
    )


def test_no_allowlist_means_any_destination(engine: PolicyEngine) -> None:
    deploy = {"client_id": "deployer", "key_labels": [], "chain_id": 11155111, "value": 10**30}
    assert_allowed(engine, hot_tx(**deploy, to=BOB), "deploy")


def test_max_value_per_tx(engine: PolicyEngine) -> None:
    assert_allowed(engine, hot_tx(value=ETHER), "hot-eth")
    assert refusal(engine, hot_tx(value=2 * ETHER)) == (
        "rule hot-eth: value 2000000000000000000 exceeds max_value_per_tx 1000000000000000000"
    )
    assert "exceeds max_value_per_tx" in refusal(engine, hot_tx(value=ETHER + 1))


def test_contract_selectors(engine: PolicyEngine) -> None:
    call = {"to": USDC, "value": 0, "has_data": True}
    assert_allowed(engine, hot_tx(**call, data_selector=TRANSFER), "hot-eth")
    assert refusal(engine, hot_tx(**call, data_selector=APPROVE)) == (
        "rule hot-eth: selector 0x095ea7b3 is not in contract_selectors"
    )
    assert refusal(engine, hot_tx(**call)) == (
        "rule hot-eth: call data shorter than a 4-byte selector is not allowed"
    )


def test_no_selectors_means_no_contract_calls(engine: PolicyEngine) -> None:
    deploy = {"client_id": "deployer", "key_labels": [], "chain_id": 11155111}
    assert refusal(engine, hot_tx(**deploy, has_data=True, data_selector=TRANSFER)) == (
        "rule deploy: contract calls are not allowed (no contract_selectors)"
    )


def test_contract_creation(engine: PolicyEngine) -> None:
    deploy = {"client_id": "deployer", "key_labels": ["any"], "chain_id": 11155111}
    assert_allowed(
        engine, hot_tx(**deploy, to=None, has_data=True, data_selector=APPROVE), "deploy"
    )
    assert refusal(engine, hot_tx(to=None, value=0, has_data=True)) == (
        "rule hot-eth: contract creation is not allowed (allow_contract_creation = false)"
    )


def typed(domain: dict[str, Any] | None, **changes: Any) -> SigningIntent:
    fields: dict[str, Any] = {
        "client_id": "anyone",
        "key_id": "k-warm",
        "key_labels": ["warm"],
        "chain": "ethereum",
        "operation": "sign:typed_data",
        "eip712_domain": domain,
    }
    fields.update(changes)
    return SigningIntent(**fields)


USDC_DOMAIN = {
    "name": "USD Coin",
    "version": "2",
    "chainId": 1,
    "verifyingContract": "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48",
}


@pytest.mark.parametrize(
    "domain",
    [
        USDC_DOMAIN,
        {**USDC_DOMAIN, "verifyingContract": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"},
        {**USDC_DOMAIN, "verifyingContract": USDC},
        {**USDC_DOMAIN, "salt": "0x" + "00" * 32},
        {"name": "Permit2"},
        {"name": "Permit2", "chainId": 137, "verifyingContract": "0x" + "11" * 20},
    ],
)
def test_eip712_domain_allowed(engine: PolicyEngine, domain: dict[str, Any]) -> None:
    assert_allowed(engine, typed(domain), "permits")


@pytest.mark.parametrize(
    "domain",
    [
        {**USDC_DOMAIN, "version": "1"},
        {**USDC_DOMAIN, "chainId": 5},
        {**USDC_DOMAIN, "chainId": "one"},
        {**USDC_DOMAIN, "chainId": True},
        # the gate gives chainId as the integer signed: text may have been signed as text
        {**USDC_DOMAIN, "chainId": "0x1"},
        {**USDC_DOMAIN, "chainId": "1"},
        {**USDC_DOMAIN, "chainId": " 1"},
        {**USDC_DOMAIN, "verifyingContract": "0x" + "11" * 20},
        {**USDC_DOMAIN, "verifyingContract": "0x1234"},
        {key: value for key, value in USDC_DOMAIN.items() if key != "version"},
        {"name": "permit2"},
        {},
    ],
)
def test_eip712_domain_refused(engine: PolicyEngine, domain: dict[str, Any]) -> None:
    assert refusal(engine, typed(domain)).startswith("rule permits: EIP-712 domain {")


def test_typed_data_needs_a_domain(engine: PolicyEngine) -> None:
    assert (
        refusal(engine, typed(None)) == "rule permits: typed data without a domain is not allowed"
    )


def test_refusal_shows_a_bounded_domain(engine: PolicyEngine) -> None:
    reason = refusal(engine, typed({"name": "x" * 10_000}))
    assert len(reason) < 200


def test_messages_and_blind_hashes(engine: PolicyEngine) -> None:
    assert_allowed(engine, typed(None, operation="sign:message"), "permits")
    blind = typed(
        None, operation="sign:hash", client_id="hsm-bridge", key_labels=["legacy"], chain="bitcoin"
    )
    assert_allowed(engine, blind, "legacy-blind")
    assert refusal(engine, typed(None, operation="sign:hash")).startswith("no rule covers")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"client_id": "wallet-cold"}, "client 'wallet-cold' with key labels ['hot']"),
        ({"key_labels": ["cold"]}, "client 'wallet-hot' with key labels ['cold']"),
        ({"key_labels": []}, "with key labels []"),
        ({"operation": "sign:message"}, "for sign:message on ethereum"),
        ({"chain": "tron"}, "for sign:transaction on tron"),
    ],
)
def test_uncovered_requests_are_refused(
    engine: PolicyEngine, changes: dict[str, Any], named: str
) -> None:
    decision = engine.check(hot_tx(**changes))
    assert decision.refused and decision.rule is None
    assert decision.reason.startswith("no rule covers ")
    assert named in decision.reason
    with pytest.raises(AccessDenied, match="no rule covers"):
        decision.raise_if_refused()


def test_a_key_with_one_listed_label_is_covered(engine: PolicyEngine) -> None:
    assert_allowed(engine, hot_tx(key_labels=["cold", "hot"]), "hot-eth")


def test_empty_policy_refuses_everything() -> None:
    engine = PolicyEngine(Policy.from_bytes(b"version = 1\n"))
    assert engine.check(hot_tx()).reason.startswith("no rule covers")


TWO_RULES = b"""version = 1
[[rules]]
name = "small"
clients = ["*"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
max_value_per_tx = 10
[[rules]]
name = "big-to-alice"
clients = ["wallet-hot"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
to_allowlist = ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"]
max_value_per_tx = 1000
"""


def test_first_granting_rule_wins_and_refusals_name_every_covering_rule() -> None:
    engine = PolicyEngine(Policy.from_bytes(TWO_RULES))
    assert engine.check(hot_tx(value=5)).rule == "small"
    assert engine.check(hot_tx(value=500)).rule == "big-to-alice"
    decision = engine.check(hot_tx(value=500, to=BOB))
    assert decision.rule == "small"
    assert decision.reason == (
        "rule small: value 500 exceeds max_value_per_tx 10; "
        "rule big-to-alice: destination 0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359 is not in "
        "to_allowlist"
    )
    with pytest.raises(AccessDenied, match=r"^rule small: value 500"):
        decision.raise_if_refused()


def test_decision_repr_does_not_dump_the_intent(engine: PolicyEngine) -> None:
    assert "SigningIntent" not in repr(engine.check(hot_tx()))


def test_alice_constant_matches_the_policy() -> None:
    assert ALICE.hex() == "5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"


CREATORS = b"""version = 1
[[rules]]
name = "hot-keys"
clients = ["provisioner"]
key_labels = ["hot", "deposit"]
operations = ["keys:create"]
chains = ["ethereum"]
[[rules]]
name = "any-keys"
clients = ["admin"]
key_labels = ["*"]
operations = ["keys:create"]
chains = ["ethereum"]
"""


@pytest.mark.parametrize(
    ("client", "labels", "allowed_by"),
    [
        ("provisioner", ["hot"], "hot-keys"),
        ("provisioner", ["hot", "deposit"], "hot-keys"),
        ("provisioner", ["hot", "cold"], None),
        ("provisioner", [], None),
        ("admin", [], "any-keys"),
        ("admin", ["cold"], "any-keys"),
    ],
)
def test_new_keys_may_only_carry_the_rules_labels(
    client: str, labels: list[str], allowed_by: str | None
) -> None:
    engine = PolicyEngine(Policy.from_bytes(CREATORS))
    intent = SigningIntent(client, "", labels, "ethereum", "keys:create")
    decision = engine.check(intent)
    assert decision.rule == allowed_by
    assert decision.allowed == (allowed_by is not None)
