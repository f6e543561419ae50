"""An example policy (the one docs/POLICY.md shows), intents and a settable clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from signd.policy import Policy, PolicyEngine, SigningIntent

NOW = 1_700_000_000.0
ETHER = 10**18
ALICE = bytes.fromhex("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed")
BOB = bytes.fromhex("fb6916095ca1df60bb79ce92ce3ea74c37c5d359")
USDC = bytes.fromhex("a0b86991c6218b36c1d19d4a2e9eb0ce3606eb48")
TRANSFER = bytes.fromhex("a9059cbb")
APPROVE = bytes.fromhex("095ea7b3")

EXAMPLE_POLICY = """\
version = 1

[[rules]]
name = "hot-eth"
clients = ["wallet-hot"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
chain_ids = [1]
to_allowlist = [
  "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
  "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
]
max_value_per_tx = "1000000000000000000"
max_value_per_window = "3000000000000000000"
window_seconds = 86400
count_fees_in_window = true
max_fee_per_tx = "10000000000000000"
max_fee_per_gas = "200000000000"
contract_selectors = ["0xa9059cbb"]

[[rules]]
name = "deploy"
clients = ["deployer"]
key_labels = ["*"]
operations = ["sign:transaction"]
chains = ["ethereum"]
chain_ids = [11155111]
allow_contract_creation = true

[[rules]]
name = "permits"
clients = ["*"]
key_labels = ["warm"]
operations = ["sign:typed_data", "sign:message"]
chains = ["ethereum"]

[[rules.eip712_domains]]
name = "USD Coin"
version = "2"
chainId = 1
verifyingContract = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"

[[rules.eip712_domains]]
name = "Permit2"

[[rules]]
name = "legacy-blind"
clients = ["hsm-bridge"]
key_labels = ["legacy"]
operations = ["sign:hash"]
chains = ["bitcoin"]
blind_signing = true
"""


@dataclass
class FakeClock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


def hot_tx(**changes: Any) -> SigningIntent:
    """A transaction the ``hot-eth`` rule allows, with ``changes`` applied."""
    fields: dict[str, Any] = {
        "client_id": "wallet-hot",
        "key_id": "k-hot-1",
        "key_labels": ["hot"],
        "chain": "ethereum",
        "operation": "sign:transaction",
        "chain_id": 1,
        "to": ALICE,
        "value": ETHER // 2,
    }
    fields.update(changes)
    return SigningIntent(**fields)


@pytest.fixture
def policy() -> Policy:
    return Policy.from_bytes(EXAMPLE_POLICY.encode())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(policy: Policy, clock: FakeClock) -> PolicyEngine:
    return PolicyEngine(policy, now=clock)
