"""The policy file: what it parses to and every way it is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from signd.errors import ConfigurationError, InvalidField
from signd.policy import Operation, Policy, PolicyHolder, SigningIntent
from signd.policy.addresses import parse_address, parse_selector
from tests.policy.conftest import ALICE, EXAMPLE_POLICY, USDC


def test_example_policy_parses(policy: Policy) -> None:
    assert [rule.name for rule in policy.rules] == ["hot-eth", "deploy", "permits", "legacy-blind"]
    assert policy.sha256 == hashlib.sha256(EXAMPLE_POLICY.encode()).hexdigest()
    hot = policy.rule("hot-eth")
    assert hot is not None
    assert hot.max_value_per_tx == 10**18
    assert hot.max_value_per_window == 3 * 10**18
    assert hot.to_allowlist == frozenset({ALICE, USDC})
    assert hot.operations == {Operation.SIGN_TRANSACTION}
    assert hot.chain_ids == frozenset({1})
    permits = policy.rule("permits")
    assert permits is not None and len(permits.eip712_domains) == 2
    assert permits.eip712_domains[0].verifying_contract == USDC
    assert policy.rule("nope") is None
    assert "sha256=" in repr(policy)


def test_absent_constraints_have_their_documented_defaults() -> None:
    policy = Policy.from_bytes(
        b'version = 1\n[[rules]]\nname = "r"\nclients = ["*"]\nkey_labels = ["*"]\n'
        b'operations = ["sign:transaction"]\nchains = ["ethereum"]\n'
        b"max_value_per_window = 5\n"
    )
    rule = policy.rules[0]
    assert rule.chain_ids is None and rule.to_allowlist is None and rule.max_value_per_tx is None
    assert rule.window_seconds == 86_400
    assert rule.contract_selectors == frozenset()
    assert not rule.allow_contract_creation and not rule.blind_signing


def test_no_rules_is_a_valid_policy_that_refuses_everything() -> None:
    assert Policy.from_bytes(b"version = 1\n").rules == ()


RULE = (
    'name = "r1"\nclients = ["*"]\nkey_labels = ["*"]\noperations = ["sign:transaction"]\n'
    'chains = ["ethereum"]\n'
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour = 1", r"unknown keys \['colour'\]"),
        ('to_allowlist = ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"]', "bad EIP-55 checksum"),
        ('to_allowlist = ["0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea"]', "0x followed by 40 hex"),
        ('to_allowlist = ["5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"]', "0x followed by 40 hex"),
        ('to_allowlist = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"', "must be a list"),
        ("max_value_per_tx = -1", "max_value_per_tx must be a non-negative integer"),
        ('max_value_per_tx = "-1"', "max_value_per_tx must be a non-negative integer"),
        ('max_value_per_tx = "1e18"', "max_value_per_tx must be a non-negative integer"),
        ("max_value_per_tx = 1.5", "max_value_per_tx must be a non-negative integer"),
        ("max_value_per_tx = true", "max_value_per_tx must be a non-negative integer"),
        (f'max_value_per_tx = "{2**256}"', "larger than 2"),
        ("max_value_per_window = -5", "max_value_per_window must be a non-negative"),
        ("window_seconds = 60", "window_seconds needs max_value_per_window"),
        ("max_value_per_window = 1\nwindow_seconds = 0", "window_seconds must be a positive"),
        ("max_value_per_window = 1\nwindow_seconds = -3", "window_seconds must be a positive"),
        ("chain_ids = [-1]", "chain_ids must be a list of non-negative integers"),
        ('chain_ids = ["1"]', "chain_ids must be a list of non-negative integers"),
        ('contract_selectors = ["0xa9059c"]', "selector is 0x followed by 8 hex"),
        ('contract_selectors = ["a9059cbb"]', "selector is 0x followed by 8 hex"),
        ('allow_contract_creation = "yes"', "allow_contract_creation must be true or false"),
        ("blind_signing = true", "blind_signing = true without sign:hash"),
        ("eip712_domains = [{}]", "at least one field"),
        ('eip712_domains = [{ name = "x", salt = "0x00" }]', r"unknown keys \['salt'\]"),
        ("eip712_domains = [{ chainId = -1 }]", "chainId must be a non-negative"),
        ("eip712_domains = [{ name = 1 }]", "name must be a string"),
        ('eip712_domains = [{ verifyingContract = "0x1" }]', "0x followed by 40 hex"),
    ],
)
def test_invalid_rule_is_refused_naming_it(extra: str, message: str) -> None:
    document = f"version = 1\n[[rules]]\n{RULE}{extra}\n"
    with pytest.raises(ConfigurationError, match=f"policy rule 'r1': .*{message}"):
        Policy.from_bytes(document.encode())


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        (
            'operations = ["sign:transaction"]',
            'operations = ["sign:everything"]',
            "unknown operation",
        ),
        ('operations = ["sign:transaction"]', "operations = []", "operations must not be empty"),
        (
            'operations = ["sign:transaction"]',
            'operations = ["sign:hash"]',
            "needs blind_signing = true",
        ),
        (
            'operations = ["sign:transaction"]',
            'operations = ["sign:typed_data"]',
            "needs eip712_domains",
        ),
        ('clients = ["*"]', 'clients = ["*", "alice"]', r"clients \['\*'\] cannot be mixed"),
        ('clients = ["*"]', "clients = []", "clients must not be empty"),
        ('clients = ["*"]', 'clients = ["has space"]', "a client id must be"),
        ('key_labels = ["*"]', 'key_labels = ["hot", "*"]', "key_labels"),
        ('key_labels = ["*"]', "", "key_labels must be a list"),
        ('chains = ["ethereum"]', "chains = []", "chains must not be empty"),
        ('chains = ["ethereum"]', 'chains = [""]', "chains must be a list of non-empty strings"),
    ],
)
def test_missing_or_inconsistent_fields_are_refused(replace: str, by: str, message: str) -> None:
    document = f"version = 1\n[[rules]]\n{RULE.replace(replace, by)}"
    with pytest.raises(ConfigurationError, match=f"policy rule 'r1': .*{message}"):
        Policy.from_bytes(document.encode())


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("", "version = 1 is required"),
        ("version = 2", "version = 1 is required"),
        ('version = "1"', "version = 1 is required"),
        ("version = 1\nextra = 1", r"unknown keys \['extra'\]"),
        ("version = 1\nrules = 1", "array of tables"),
        ("version = 1\n[[rules]]\nname = 3", r"rules\[0\]: name must be"),
        ("version = 1\n[[rules]]\nclients = []", r"rules\[0\]: name must be"),
        (f"version = 1\n[[rules]]\n{RULE}[[rules]]\n{RULE}", r"used twice: \['r1'\]"),
        ("version = [", "not valid TOML"),
    ],
)
def test_invalid_files_are_refused(document: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Policy.from_bytes(document.encode())


def test_values_may_be_given_as_int_or_string() -> None:
    for text in ("12345", '"12345"'):
        policy = Policy.from_bytes(
            f"version = 1\n[[rules]]\n{RULE}max_value_per_tx = {text}\n".encode()
        )
        assert policy.rules[0].max_value_per_tx == 12345


@pytest.mark.parametrize(
    "address",
    [
        # EIP-55's own test vectors
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        "0x52908400098527886E0F7030069857D2E4169EE7",
        "0xde709f2102306220921060314715629080e2fb77",
        "0x27b1fdb04752bbc536007a920d24acb045561c26",
        "0x0000000000000000000000000000000000000000",
    ],
)
def test_eip55_vectors_are_accepted(address: str) -> None:
    assert parse_address(address) == bytes.fromhex(address[2:])


@pytest.mark.parametrize(
    "address",
    [
        "0x5AAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfb6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9adb",
    ],
)
def test_eip55_wrong_case_is_refused(address: str) -> None:
    assert address.lower() != address and address.upper()[2:] != address[2:]
    with pytest.raises(InvalidField, match="bad EIP-55 checksum"):
        parse_address(address)
    assert parse_address(address.lower()) == parse_address("0x" + address[2:].upper())


def test_selectors_parse_either_case() -> None:
    assert parse_selector("0xA9059CBB") == parse_selector("0xa9059cbb") == bytes.fromhex("a9059cbb")


def test_intent_validation() -> None:
    base: dict[str, Any] = {
        "client_id": "c",
        "key_id": "k",
        "key_labels": ["hot"],
        "chain": "ethereum",
    }
    intent = SigningIntent(**base, operation="sign:transaction", to=ALICE, value=1)
    assert intent.operation is Operation.SIGN_TRANSACTION
    assert intent.key_labels == frozenset({"hot"})
    assert SigningIntent(**base, operation="sign:transaction").creates_contract
    assert not SigningIntent(**base, operation="sign:message").creates_contract
    bad: list[dict[str, Any]] = [
        {"operation": "sign:all"},
        {"operation": "sign:transaction", "to": b"\x00" * 19},
        {"operation": "sign:transaction", "to": "0x" + "00" * 20},
        {"operation": "sign:transaction", "value": -1},
        {"operation": "sign:transaction", "value": True},
        {"operation": "sign:transaction", "chain_id": -1},
        {"operation": "sign:transaction", "data_selector": b"\x00" * 3, "has_data": True},
        {"operation": "sign:transaction", "data_selector": b"\x00" * 4},
    ]
    for changes in bad:
        with pytest.raises(InvalidField):
            SigningIntent(**base, **changes)
    with pytest.raises(InvalidField, match="collection of labels"):
        SigningIntent("c", "k", "hot", "ethereum", "sign:message")


def test_holder_reload_good_and_bad(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE_POLICY)
    holder = PolicyHolder.load(path)
    first = holder.current
    assert holder.sha256 == first.sha256

    path.write_text(EXAMPLE_POLICY.replace('"1000000000000000000"', '"-1"'))
    with pytest.raises(ConfigurationError, match="policy rule 'hot-eth': max_value_per_tx"):
        holder.reload()
    assert holder.current is first

    path.write_text("version = 1\n")
    assert holder.reload().rules == ()
    assert holder.current.rules == ()
    assert holder.sha256 == hashlib.sha256(b"version = 1\n").hexdigest()
