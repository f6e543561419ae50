"""The examples in docs/POLICY.md are real files: they parse, and the policy is the tests' own."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from signd.auth import ClientsRegistry
from signd.policy import Policy
from tests.policy.conftest import EXAMPLE_POLICY

DOC = Path(__file__).parents[2] / "docs" / "POLICY.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_documented_clients_file_parses() -> None:
    (clients,) = [block for block in toml_blocks() if "[[clients]]" in block]
    registry = ClientsRegistry.from_bytes(clients.encode())
    assert {c.client_id for c in registry.clients()} == {"wallet-hot", "mobile", "web3-bridge"}
    assert registry.verify_bearer("test").client_id == "web3-bridge"


def test_documented_policy_is_the_tested_one() -> None:
    (policy,) = [block for block in toml_blocks() if "[[rules]]" in block]
    assert tomllib.loads(policy) == tomllib.loads(EXAMPLE_POLICY)
    assert len(Policy.from_bytes(policy.encode()).rules) == 4
