"""Property: through the API, a random transaction is signed exactly when the policy's
oracle (written out here, independently of the engine) allows it."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.chains.ethereum.transactions import decode_transaction
from tests.gate.support import (
    BOTH_GATES,
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
datas = st.sampled_from(["0x", TRANSFER + "00" * 68, APPROVE + "00" * 68, "0x12", TRANSFER])
transactions = st.fixed_dictionaries(
    {
        "chain_id": st.sampled_from([1, 5, 11155111, 31337]),
        "to": st.sampled_from([RECIPIENT, OTHER.lower(), None]),
        "value": values,
        "data": datas,
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
        and (tx["value"] == 0 or spent + tx["value"] <= MAX_PER_WINDOW)
    )


def test_a_transaction_is_signed_only_if_the_policy_allows_it(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    spent = 0
    outcomes = {True: 0, False: 0}

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(tx=transactions)
    def check(tx: dict[str, Any]) -> None:
        nonlocal spent
        allowed = oracle(tx, spent)
        request = {"key": hot_key["address"], "transaction": transaction(**tx)}
        response = gated.signed("POST", "/v1/sign/ethereum/transaction", request)
        outcomes[allowed] += 1
        if not allowed:
            assert response.status_code == 403, (tx, response.text)
            assert response.json()["error"]["code"] == "policy_denied"
            return
        assert response.status_code == 200, (tx, response.text)
        raw = bytes.fromhex(response.json()["raw_transaction"][2:])
        assert Account.recover_transaction(raw) == hot_key["address"]
        signed = decode_transaction(raw).transaction  # what was signed is what was asked
        assert signed.chain_id == tx["chain_id"] and signed.value == tx["value"]
        assert signed.to == bytes.fromhex(tx["to"][2:])
        assert signed.data == bytes.fromhex(tx["data"][2:])
        spent += tx["value"]

    check()
    assert outcomes[True] > 0 and outcomes[False] > 0  # both sides were exercised
