"""Property: through the API, a random transaction is signed exactly when the policy's
oracle (written out here, independently of the engine) allows it: none over a value, window
or fee limit."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.chains.ethereum.transactions import decode_transaction
from tests.gate.support import (
    BOTH_GATES,
    MAX_FEE_PER_GAS,
    MAX_FEE_PER_TX,
    MAX_PER_TX,
    MAX_PER_WINDOW,
    OTHER,
    RECIPIENT,
    TRANSFER,
    Gated,
    transaction,
)

pytestmark = BOTH_GATES

ALLOWED_CHAINS = {1, 11155111}
APPROVE = "0x095ea7b3"

values = st.one_of(
    st.sampled_from([0, 1, MAX_PER_TX - 1, MAX_PER_TX, MAX_PER_TX + 1]),
    st.integers(min_value=0, max_value=2 * MAX_PER_TX),
)
AT_FEE_CAP = MAX_FEE_PER_TX // MAX_FEE_PER_GAS
"""The gas limit whose fee at :data:`MAX_FEE_PER_GAS` is exactly :data:`MAX_FEE_PER_TX`."""
gas_limits = st.sampled_from([21_000, 100_000, AT_FEE_CAP, AT_FEE_CAP + 1, 10**7])
fees_per_gas = st.one_of(
    st.sampled_from([1, 30 * 10**9, MAX_FEE_PER_GAS, MAX_FEE_PER_GAS + 1, 10**24]),
    st.integers(min_value=1, max_value=2 * MAX_FEE_PER_GAS),
)
datas = st.sampled_from(["0x", TRANSFER + "00" * 68, APPROVE + "00" * 68, "0x12", TRANSFER])
transactions = st.fixed_dictionaries(
    {
        "chain_id": st.sampled_from([1, 5, 11155111, 31337]),
        "to": st.sampled_from([RECIPIENT, OTHER.lower(), None]),
        "value": values,
        "data": datas,
        "gas": gas_limits,
        "max_fee_per_gas": fees_per_gas,
    }
)


def oracle(tx: dict[str, Any], spent: int) -> bool:
    """The fixed policy's rule hot-eth, by hand."""
    data = bytes.fromhex(tx["data"][2:])
    return (
        tx["chain_id"] in ALLOWED_CHAINS
        and tx["to"] is not None
        and tx["to"].lower() == RECIPIENT.lower()
        and (not data or data[:4] == bytes.fromhex(TRANSFER[2:]))
        and tx["value"] <= MAX_PER_TX
        and tx["max_fee_per_gas"] <= MAX_FEE_PER_GAS
        and tx["gas"] * tx["max_fee_per_gas"] <= MAX_FEE_PER_TX
        and (tx["value"] == 0 or spent + tx["value"] <= MAX_PER_WINDOW)
    )


fee_transactions = st.fixed_dictionaries(
    {
        "chain_id": st.just(1),
        "to": st.just(RECIPIENT),
        "value": st.sampled_from([0, 1]),
        "data": st.just("0x"),
        "gas": gas_limits,
        "max_fee_per_gas": fees_per_gas,
    }
)
"""Transactions that differ only in gas and fees, for the fee limits alone."""


def signed_exactly_as_the_oracle_says(
    gated: Gated, hot_key: dict[str, Any], strategy: st.SearchStrategy[dict[str, Any]]
) -> None:
    spent = 0
    outcomes = {True: 0, False: 0}

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(tx=strategy)
    def check(tx: dict[str, Any]) -> None:
        nonlocal spent
        allowed = oracle(tx, spent)
        request = {"key": hot_key["address"], "transaction": transaction(**tx)}
        response = gated.signed("POST", "/v1/sign/ethereum/transaction", request)
        outcomes[allowed] += 1
        if not allowed:
            assert response.status_code == 403, (tx, response.text)
            error = response.json()["error"]
            assert (error["code"], error["rule"]) == ("policy_denied", "hot-eth")
            return
        assert response.status_code == 200, (tx, response.text)
        raw = bytes.fromhex(response.json()["raw_transaction"][2:])
        assert Account.recover_transaction(raw) == hot_key["address"]
        signed = decode_transaction(raw).transaction  # what was signed is what was asked
        assert signed.chain_id == tx["chain_id"] and signed.value == tx["value"]
        assert signed.to == bytes.fromhex(tx["to"][2:])
        assert signed.data == bytes.fromhex(tx["data"][2:])
        assert (signed.gas, signed.fee_per_gas) == (tx["gas"], tx["max_fee_per_gas"])
        spent += tx["value"]

    check()
    assert outcomes[True] > 0 and outcomes[False] > 0  # both sides were exercised


def test_a_transaction_is_signed_only_if_the_policy_allows_it(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    signed_exactly_as_the_oracle_says(gated, hot_key, transactions)


def test_no_transaction_over_a_fee_limit_is_signed(gated: Gated, hot_key: dict[str, Any]) -> None:
    """Gas limits and fees at, just over and far over max_fee_per_tx and max_fee_per_gas."""
    signed_exactly_as_the_oracle_says(gated, hot_key, fee_transactions)
