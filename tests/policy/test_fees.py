"""Fee limits: ``max_fee_per_tx``, ``max_fee_per_gas`` and ``count_fees_in_window``.

The intents of the transaction tests are built as the gate builds them, by decoding the
transaction that will be signed (:func:`signd.gate.intents.prepare`), host fills applied.
"""

from __future__ import annotations

from typing import Any

import pytest

from signd.audit.records import Spend
from signd.crypto.hashing import keccak256
from signd.custody.base import KeyInfo, utc_now
from signd.errors import ConfigurationError, InvalidField
from signd.gate.intents import prepare
from signd.gate.interpret import apply_fills
from signd.gate.operations import SigningKind
from signd.policy import Policy, PolicyEngine, SigningIntent, SpendWindowsUnavailable
from tests.policy.conftest import NOW, hot_tx
from tests.policy.test_docs import DOC

GWEI = 10**9
MAX_FEE_PER_GAS = 100 * GWEI
MAX_FEE_PER_TX = 21_000 * MAX_FEE_PER_GAS
RECIPIENT = "0x" + "35" * 20
KEY = KeyInfo(
    "k1",
    "ethereum",
    "0x" + "11" * 20,
    b"\x02" * 33,
    "enclave",
    utc_now(),
    ("hot",),
)
RULE = f"""
[[rules]]
name = "capped"
clients = ["alice"]
key_labels = ["hot"]
operations = ["sign:transaction", "sign:message", "sign:typed_data", "sign:hash"]
chains = ["ethereum"]
blind_signing = true
eip712_domains = [{{ chainId = 1 }}]
max_fee_per_tx = "{MAX_FEE_PER_TX}"
max_fee_per_gas = {MAX_FEE_PER_GAS}
"""
FEE_CAPS = ("version = 1\n" + RULE).encode()


def legacy(**changes: Any) -> dict[str, Any]:
    tx = {
        "type": "0x0",
        "chainId": "0x1",
        "nonce": "0x0",
        "gasPrice": hex(MAX_FEE_PER_GAS),
        "gas": hex(21_000),
        "to": RECIPIENT,
        "value": "0x1",
    }
    return {**tx, **changes}


def access_list(**changes: Any) -> dict[str, Any]:
    return legacy(type="0x1", accessList=[], **changes)


def dynamic(**changes: Any) -> dict[str, Any]:
    tx = legacy(type="0x2", maxPriorityFeePerGas=hex(GWEI), maxFeePerGas=hex(MAX_FEE_PER_GAS))
    del tx["gasPrice"]
    return {**tx, **changes}


PRICE_FIELD = {"legacy": "gasPrice", "eip2930": "gasPrice", "eip1559": "maxFeePerGas"}
BUILD = {"legacy": legacy, "eip2930": access_list, "eip1559": dynamic}


def intent_of(tx: dict[str, Any]) -> SigningIntent:
    """The intent the gate judges for ``tx`` signed with :data:`KEY` by alice."""
    prepared = prepare(SigningKind.ETH_TRANSACTION, tx, KEY)
    return SigningIntent(
        "alice", KEY.key_id, KEY.labels, "ethereum", prepared.operation, **prepared.facts
    )


def capped() -> PolicyEngine:
    return PolicyEngine(Policy.from_bytes(FEE_CAPS), now=lambda: NOW)


# -- the policy file ----------------------------------------------------------------------


def test_fee_settings_parse_and_default_to_no_limit() -> None:
    rule = Policy.from_bytes(FEE_CAPS).rules[0]
    assert (rule.max_fee_per_tx, rule.max_fee_per_gas) == (MAX_FEE_PER_TX, MAX_FEE_PER_GAS)
    assert not rule.count_fees_in_window
    plain = Policy.from_bytes(FEE_CAPS.replace(b"max_fee", b"#max_fee")).rules[0]
    assert (plain.max_fee_per_tx, plain.max_fee_per_gas) == (None, None)


BASE = (
    'version = 1\n[[rules]]\nname = "r1"\nclients = ["*"]\nkey_labels = ["*"]\n'
    'operations = ["sign:transaction"]\nchains = ["ethereum"]\n'
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("max_fee_per_tx = -1", "max_fee_per_tx must be a non-negative integer"),
        ('max_fee_per_tx = "1e16"', "max_fee_per_tx must be a non-negative integer"),
        ("max_fee_per_tx = 0.5", "max_fee_per_tx must be a non-negative integer"),
        ("max_fee_per_tx = true", "max_fee_per_tx must be a non-negative integer"),
        (f'max_fee_per_tx = "{2**256}"', "max_fee_per_tx is larger than 2"),
        ('max_fee_per_gas = "-1"', "max_fee_per_gas must be a non-negative integer"),
        ('max_fee_per_gas = "100 gwei"', "max_fee_per_gas must be a non-negative integer"),
        (f"max_fee_per_gas = {2**63}.0", "max_fee_per_gas must be a non-negative integer"),
        (f'max_fee_per_gas = "{2**256}"', "max_fee_per_gas is larger than 2"),
        ("count_fees_in_window = true", "count_fees_in_window needs max_value_per_window"),
        (
            'max_value_per_window = 5\ncount_fees_in_window = "yes"',
            "count_fees_in_window must be true or false",
        ),
    ],
)
def test_bad_fee_settings_are_refused_naming_the_rule(extra: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"policy rule 'r1': {message}"):
        Policy.from_bytes(f"{BASE}{extra}\n".encode())


def test_fee_limits_may_be_given_as_int_or_string() -> None:
    for text in ("12345", '"12345"'):
        document = f"{BASE}max_fee_per_tx = {text}\nmax_fee_per_gas = {text}\n"
        rule = Policy.from_bytes(document.encode()).rules[0]
        assert rule.max_fee_per_tx == rule.max_fee_per_gas == 12345


def test_intent_fee_fields_are_validated() -> None:
    base = ("c", "k", ["hot"], "ethereum", "sign:transaction")
    intent = SigningIntent(*base, gas=21_000, fee_per_gas=3)
    assert (intent.gas, intent.fee_per_gas, intent.fee) == (21_000, 3, 63_000)
    assert SigningIntent(*base).fee == 0
    for bad in ({"gas": -1}, {"gas": True}, {"fee_per_gas": -1}, {"fee_per_gas": 1.0}):
        with pytest.raises(InvalidField):
            SigningIntent(*base, **bad)


# -- the limits, for each transaction type -------------------------------------------------


@pytest.mark.parametrize("kind", BUILD)
def test_the_fee_is_derived_from_the_transaction_signed(kind: str) -> None:
    tx = BUILD[kind](gas=hex(50_000), **{PRICE_FIELD[kind]: hex(7 * GWEI)})
    intent = intent_of(tx)
    assert (intent.gas, intent.fee_per_gas, intent.fee) == (50_000, 7 * GWEI, 350_000 * GWEI)


@pytest.mark.parametrize("kind", BUILD)
def test_max_fee_per_gas_allows_its_cap_and_refuses_one_wei_more(kind: str) -> None:
    engine = capped()
    at_cap = BUILD[kind](gas=hex(1), **{PRICE_FIELD[kind]: hex(MAX_FEE_PER_GAS)})
    assert engine.check(intent_of(at_cap)).allowed
    over = BUILD[kind](gas=hex(1), **{PRICE_FIELD[kind]: hex(MAX_FEE_PER_GAS + 1)})
    decision = engine.check(intent_of(over))
    assert decision.refused and decision.rule == "capped"
    assert decision.reason == (
        f"rule capped: fee per gas {MAX_FEE_PER_GAS + 1} exceeds max_fee_per_gas {MAX_FEE_PER_GAS}"
    )


@pytest.mark.parametrize("kind", BUILD)
def test_max_fee_per_tx_allows_its_cap_and_refuses_one_wei_more(kind: str) -> None:
    """gas × price at the cap is allowed; a gas limit one higher, or (at a price of 1 wei)
    one wei more fee, is refused, though the price is well under max_fee_per_gas."""
    engine = capped()
    assert engine.check(intent_of(BUILD[kind]())).allowed  # 21000 × the highest price
    one_more_gas = intent_of(BUILD[kind](gas=hex(21_001)))
    decision = engine.check(one_more_gas)
    assert decision.refused and decision.rule == "capped"
    assert decision.reason == (
        f"rule capped: fee {21_001 * MAX_FEE_PER_GAS} (gas 21001 at {MAX_FEE_PER_GAS} per gas) "
        f"exceeds max_fee_per_tx {MAX_FEE_PER_TX}"
    )
    if kind == "eip1559":
        cheap = {"maxPriorityFeePerGas": "0x1", "maxFeePerGas": "0x1"}
    else:
        cheap = {"gasPrice": "0x1"}
    assert engine.check(intent_of(BUILD[kind](gas=hex(MAX_FEE_PER_TX), **cheap))).allowed
    over = engine.check(intent_of(BUILD[kind](gas=hex(MAX_FEE_PER_TX + 1), **cheap)))
    assert over.refused and f"exceeds max_fee_per_tx {MAX_FEE_PER_TX}" in over.reason


def test_eip1559_is_judged_by_max_fee_per_gas_not_the_priority_fee() -> None:
    tx = dynamic(gas="0x1", maxPriorityFeePerGas="0x1", maxFeePerGas=hex(MAX_FEE_PER_GAS + 1))
    decision = capped().check(intent_of(tx))
    assert decision.refused and "max_fee_per_gas" in decision.reason


def test_a_zero_fee_cap_allows_only_free_transactions() -> None:
    engine = PolicyEngine(
        Policy.from_bytes(f"{BASE}max_fee_per_tx = 0\nmax_fee_per_gas = 0\n".encode())
    )
    base = ("c", "k", [], "ethereum", "sign:transaction", 1, b"\x35" * 20)
    assert engine.check(SigningIntent(*base, gas=21_000)).allowed
    paid = SigningIntent(*base, gas=21_000, fee_per_gas=1)
    assert engine.check(paid).reason == (
        "rule r1: fee 21000 (gas 21000 at 1 per gas) exceeds max_fee_per_tx 0"
    )


def test_a_fee_the_host_filled_is_judged_like_one_the_caller_gave() -> None:
    """The host may fill the fees and the gas a caller left out; the intent comes from the
    transaction with those fills applied, so an absurd fill is refused by the rule."""
    engine = capped()
    asked = legacy()
    del asked["gasPrice"], asked["gas"]
    honest = apply_fills(asked, {"gasPrice": hex(30 * GWEI), "gas": hex(21_000)})
    assert engine.check(intent_of(honest)).allowed
    absurd_price = apply_fills(asked, {"gasPrice": hex(10**24), "gas": hex(21_000)})
    decision = engine.check(intent_of(absurd_price))
    assert decision.refused and decision.rule == "capped"
    assert decision.reason.startswith(f"rule capped: fee {21_000 * 10**24} (gas 21000 at ")
    absurd_gas = apply_fills(asked, {"gasPrice": hex(GWEI), "gas": hex(10**9)})
    decision = engine.check(intent_of(absurd_gas))
    assert decision.refused and decision.reason.endswith(f"max_fee_per_tx {MAX_FEE_PER_TX}")

    eip1559 = dynamic()
    del eip1559["maxFeePerGas"], eip1559["maxPriorityFeePerGas"]
    filled = apply_fills(eip1559, {"maxFeePerGas": hex(10**24), "maxPriorityFeePerGas": "0x1"})
    assert "max_fee_per_tx" in engine.check(intent_of(filled)).reason


def test_messages_typed_data_and_hashes_are_not_judged_by_fee_limits() -> None:
    engine = PolicyEngine(Policy.from_bytes(FEE_CAPS.replace(str(MAX_FEE_PER_TX).encode(), b"0")))
    for kind, payload in (
        (SigningKind.ETH_MESSAGE, b"hello"),
        (SigningKind.HASH, keccak256(b"x")),
        (
            SigningKind.ETH_TYPED_DATA,
            {
                "types": {"EIP712Domain": [{"name": "chainId", "type": "uint256"}]},
                "primaryType": "EIP712Domain",
                "domain": {"chainId": 1},
                "message": {},
            },
        ),
    ):
        prepared = prepare(kind, payload, KEY)
        intent = SigningIntent(
            "alice", "k1", KEY.labels, "ethereum", prepared.operation, **prepared.facts
        )
        assert intent.fee == 0
        assert engine.check(intent).allowed, (kind, engine.check(intent).reason)
    assert engine.check(intent_of(legacy())).refused  # the same rule refuses a paid fee


# -- fees in the spend window --------------------------------------------------------------

WINDOW = 21_000 * GWEI * 3 + 300
WINDOWED = f"""version = 1

[[rules]]
name = "daily"
clients = ["alice"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
max_value_per_window = {WINDOW}
window_seconds = 3600
"""


def windowed(count_fees: bool) -> PolicyEngine:
    text = WINDOWED + ("count_fees_in_window = true\n" if count_fees else "")
    return PolicyEngine(Policy.from_bytes(text.encode()), now=lambda: NOW)


def paid(value: int, price: int = GWEI) -> SigningIntent:
    return intent_of(legacy(value=hex(value), gasPrice=hex(price)))


def test_with_count_fees_in_window_value_and_worst_case_fee_are_spent() -> None:
    engine = windowed(count_fees=True)
    spends = []
    for _ in range(3):
        intent = paid(100)
        spends.append(engine.commit(engine.check(intent), intent))
    assert spends == [Spend("daily", "k1", 100 + 21_000 * GWEI)] * 3
    assert engine.spent("daily", "k1") == WINDOW  # exactly at the limit: allowed
    free = paid(0, price=0)  # neither value nor fee: nothing to count
    assert engine.commit(engine.check(free), free) is None
    fee_only = engine.check(paid(0))  # a fee alone counts too
    assert fee_only.refused and "value 0 and fee 21000000000000 on top of" in fee_only.reason
    decision = engine.check(paid(1, price=0))
    assert decision.refused and decision.reason == (  # no fee: worded as before
        f"rule daily: value 1 on top of {WINDOW} spent in the last 3600 s "
        f"exceeds max_value_per_window {WINDOW}"
    )


def test_count_fees_in_window_refuses_one_wei_over_the_window() -> None:
    engine = windowed(count_fees=True)
    exact = paid(WINDOW - 21_000 * GWEI)
    assert engine.check(exact).allowed
    over = paid(WINDOW - 21_000 * GWEI + 1)
    decision = engine.check(over)
    assert decision.refused and decision.reason == (
        f"rule daily: value {WINDOW - 21_000 * GWEI + 1} and fee {21_000 * GWEI} on top of 0 "
        f"spent in the last 3600 s exceeds max_value_per_window {WINDOW}"
    )


def test_without_count_fees_in_window_only_value_is_spent() -> None:
    """Policies written before fee limits keep their meaning."""
    engine = windowed(count_fees=False)
    intent = paid(WINDOW, price=10**12)
    assert engine.commit(engine.check(intent), intent) == Spend("daily", "k1", WINDOW)
    free_of_value = paid(0, price=10**12)
    assert engine.check(free_of_value).allowed
    assert engine.commit(engine.check(free_of_value), free_of_value) is None


def test_counted_fees_are_rebuilt_from_the_audit_spends() -> None:
    """What commit returns (and the audit record keeps) is what replay counts again."""
    first = windowed(count_fees=True)
    intent = paid(100)
    spend = first.commit(first.check(intent), intent)
    assert spend is not None
    restarted = windowed(count_fees=True)
    restarted.await_replay("starting")
    with pytest.raises(SpendWindowsUnavailable):
        restarted.check(paid(0))  # a fee alone would count: the window must be whole
    restarted.replay([(NOW - 1, spend)])
    assert restarted.spent("daily", "k1") == first.spent("daily", "k1") == 100 + 21_000 * GWEI


def test_the_documented_example_caps_fees(policy: Policy) -> None:
    hot = policy.rule("hot-eth")
    assert hot is not None and hot.count_fees_in_window
    assert (hot.max_fee_per_tx, hot.max_fee_per_gas) == (10**16, 200 * GWEI)
    engine = PolicyEngine(policy, now=lambda: NOW)
    assert engine.check(hot_tx(gas=21_000, fee_per_gas=200 * GWEI)).allowed
    refused = engine.check(hot_tx(gas=21_000, fee_per_gas=10**24))
    assert refused.refused and refused.rule == "hot-eth"
    assert refused.reason.endswith("exceeds max_fee_per_tx 10000000000000000")


def test_the_documented_fee_refusals_are_the_engines(policy: Policy) -> None:
    """docs/POLICY.md shows these refusals of the example's hot-eth; they are word for word
    what the engine says."""
    documented = DOC.read_text()
    engine = PolicyEngine(policy, now=lambda: NOW)
    intents = (
        hot_tx(gas=21_000, fee_per_gas=10**24),
        hot_tx(gas=21_000, fee_per_gas=300 * GWEI),
    )
    for intent in intents:
        reason = engine.check(intent).reason
        assert f"\n{reason}\n" in documented, reason
    for _ in range(3):
        spend = hot_tx(value=10**18)
        engine.commit(engine.check(spend), spend)
    reason = engine.check(hot_tx(value=0, gas=21_000, fee_per_gas=200 * GWEI)).reason
    assert f"\n{reason}\n" in documented, reason
