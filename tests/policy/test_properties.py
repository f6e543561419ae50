"""Property tests: nothing outside the policy is ever allowed, no fee over a rule's caps, and
windows are never exceeded.

Random policies are written out as TOML and parsed by signd; random intents are judged both
by the engine and by :func:`oracle_allows`, a deliberately plain reading of docs/POLICY.md
over the raw rule tables. The two must agree on every intent: allowed exactly when some
rule's every constraint holds, and by the first such rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.policy import Policy, PolicyEngine, SigningIntent

CLIENTS = ["alice", "bob", "carol"]
LABELS = ["hot", "cold", "warm"]
CHAINS = ["ethereum", "tron"]
CHAIN_IDS = [1, 5, 137]
ADDRESSES = [bytes([n]) * 20 for n in (0x11, 0xAB, 0xC7)]
SELECTORS = [bytes.fromhex(s) for s in ("a9059cbb", "095ea7b3", "23b872dd")]
OPERATIONS = ["keys:create", "sign:transaction", "sign:message", "sign:typed_data", "sign:hash"]
NAMES = ["USD Coin", "Permit2"]
VERSIONS = ["1", "2"]

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wildcard_or(pool: Sequence[str]) -> st.SearchStrategy[list[str]]:
    return st.just(["*"]) | st.sets(st.sampled_from(pool), min_size=1).map(sorted)


def hex_address(address: bytes, upper: bool) -> str:
    digits = address.hex()
    return "0x" + (digits.upper() if upper else digits)


@st.composite
def domain_patterns(draw: st.DrawFn) -> dict[str, Any]:
    pattern: dict[str, Any] = {}
    if draw(st.booleans()):
        pattern["name"] = draw(st.sampled_from(NAMES))
    if draw(st.booleans()):
        pattern["version"] = draw(st.sampled_from(VERSIONS))
    if draw(st.booleans()):
        pattern["chainId"] = draw(st.sampled_from(CHAIN_IDS))
    if draw(st.booleans()) or not pattern:
        pattern["verifyingContract"] = hex_address(draw(st.sampled_from(ADDRESSES)), False)
    return pattern


def amounts() -> st.SearchStrategy[int | str]:
    return st.integers(0, 12) | st.integers(0, 12).map(str)


def fee_caps() -> st.SearchStrategy[int | str]:
    """A fee limit near the fees :func:`intents` draws (gas and price each 0-6)."""
    return st.integers(0, 36) | st.integers(0, 36).map(str)


@st.composite
def rule_tables(draw: st.DrawFn, name: str) -> dict[str, Any]:
    operations = sorted(draw(st.sets(st.sampled_from(OPERATIONS), min_size=1)))
    rule: dict[str, Any] = {
        "name": name,
        "clients": draw(wildcard_or(CLIENTS)),
        "key_labels": draw(wildcard_or(LABELS)),
        "operations": operations,
        "chains": sorted(draw(st.sets(st.sampled_from(CHAINS), min_size=1))),
    }
    if draw(st.booleans()):
        rule["chain_ids"] = sorted(draw(st.sets(st.sampled_from(CHAIN_IDS))))
    if draw(st.booleans()):
        chosen = draw(st.sets(st.sampled_from(ADDRESSES)))
        rule["to_allowlist"] = [hex_address(a, draw(st.booleans())) for a in sorted(chosen)]
    if draw(st.booleans()):
        rule["max_value_per_tx"] = draw(amounts())
    if draw(st.booleans()):
        rule["max_value_per_window"] = draw(amounts())
        if draw(st.booleans()):
            rule["window_seconds"] = draw(st.integers(1, 20))
        if draw(st.booleans()):
            rule["count_fees_in_window"] = draw(st.booleans())
    if draw(st.booleans()):
        rule["max_fee_per_tx"] = draw(fee_caps())
    if draw(st.booleans()):
        rule["max_fee_per_gas"] = draw(st.integers(0, 6) | st.integers(0, 6).map(str))
    if draw(st.booleans()):
        rule["contract_selectors"] = [
            "0x" + s.hex() for s in draw(st.sets(st.sampled_from(SELECTORS)))
        ]
    if draw(st.booleans()):
        rule["allow_contract_creation"] = draw(st.booleans())
    if "sign:typed_data" in operations or draw(st.booleans()):
        rule["eip712_domains"] = draw(st.lists(domain_patterns(), min_size=1, max_size=3))
    if "sign:hash" in operations:
        rule["blind_signing"] = True
    elif draw(st.booleans()):
        rule["blind_signing"] = False
    return rule


@st.composite
def policies(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 4))
    return [draw(rule_tables(f"rule-{n}")) for n in range(count)]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def to_toml(rules: list[dict[str, Any]]) -> bytes:
    lines = ["version = 1"]
    for rule in rules:
        lines.append("[[rules]]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in rule.items())
    return "\n".join(lines).encode()


def near(draw: st.DrawFn, listed: Sequence[Any] | None, anything: Sequence[Any]) -> Any:
    """Mostly a value the rule lists (so rules often grant), sometimes any value."""
    if listed and draw(st.integers(0, 3)) > 0:
        return draw(st.sampled_from(listed))
    return draw(st.sampled_from(anything))


@st.composite
def intents(
    draw: st.DrawFn, rules: Sequence[Mapping[str, Any]] = (), key_ids: Sequence[str] = ("k1",)
) -> SigningIntent:
    """An intent aimed at one of ``rules`` (each field usually within it), or at random."""
    rule: Mapping[str, Any] = draw(st.sampled_from(rules)) if rules else {}

    def listed(key: str) -> list[Any] | None:
        values = rule.get(key)
        return None if values is None or values == ["*"] else list(values)

    labels = {near(draw, listed("key_labels"), [*LABELS, "other"])}
    labels |= draw(st.sets(st.sampled_from([*LABELS, "other"]), max_size=1))
    operation = near(draw, listed("operations"), OPERATIONS)
    allowlist = [bytes.fromhex(a[2:]) for a in rule.get("to_allowlist", [])]
    to = near(draw, allowlist, [None, *ADDRESSES, b"\x42" * 20])
    if (
        operation == "sign:transaction"
        and rule.get("allow_contract_creation")
        and draw(st.booleans())
    ):
        to = None
    has_data = draw(st.booleans())
    selectors = [bytes.fromhex(s[2:]) for s in rule.get("contract_selectors", [])]
    selector = near(draw, selectors, [None, *SELECTORS, b"\xde\xad\xbe\xef"]) if has_data else None
    limits = [int(rule[k]) for k in ("max_value_per_tx", "max_value_per_window") if k in rule]
    value = (
        draw(st.integers(0, min(limits)))
        if limits != [] and draw(st.booleans())
        else draw(st.integers(0, 12))
    )
    gas, fee_per_gas = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    if "max_fee_per_tx" in rule and draw(st.booleans()):  # often just at, or just over, it
        gas = draw(st.sampled_from([1, 2, 3]))
        fee_per_gas = int(rule["max_fee_per_tx"]) // gas + draw(st.integers(0, 1))
    domain: dict[str, Any] | None = None
    patterns = rule.get("eip712_domains")
    if patterns and draw(st.integers(0, 3)) > 0:
        domain = dict(draw(st.sampled_from(patterns)))
        if "chainId" in domain:
            number = domain["chainId"]
            domain["chainId"] = draw(st.sampled_from([number, hex(number), str(number)]))
    elif draw(st.booleans()):
        domain = {}
    if domain is not None:
        if draw(st.booleans()):
            domain["name"] = draw(st.sampled_from([*NAMES, "Other"]))
        if draw(st.booleans()):
            domain["version"] = draw(st.sampled_from([*VERSIONS, "3"]))
        if draw(st.booleans()):
            chain_id = draw(st.sampled_from([*CHAIN_IDS, 10]))
            domain["chainId"] = draw(st.sampled_from([chain_id, hex(chain_id), str(chain_id)]))
        if draw(st.booleans()):
            address = draw(st.sampled_from([*ADDRESSES, b"\x99" * 20]))
            domain["verifyingContract"] = hex_address(address, draw(st.booleans()))
    return SigningIntent(
        client_id=near(draw, listed("clients"), [*CLIENTS, "mallory"]),
        key_id=draw(st.sampled_from(key_ids)),
        key_labels=labels if draw(st.integers(0, 5)) else set(),
        chain=near(draw, listed("chains"), [*CHAINS, "bitcoin"]),
        operation=operation,
        chain_id=None
        if draw(st.integers(0, 4)) == 0
        else near(draw, listed("chain_ids"), [*CHAIN_IDS, 10]),
        to=to,
        value=value,
        has_data=has_data,
        data_selector=selector,
        eip712_domain=domain,
        gas=gas,
        fee_per_gas=fee_per_gas,
    )


def domain_number(value: Any) -> int | None:
    """The gate gives a domain's chainId as the integer signed; text ("0x1", "1") may have
    been signed as text, so it is no chain (docs/POLICY.md)."""
    return value if type(value) is int else None


def domain_matches(pattern: Mapping[str, Any], domain: Mapping[str, Any]) -> bool:
    for key, wanted in pattern.items():
        if key not in domain:
            return False
        if key == "chainId":
            if domain_number(domain[key]) != wanted:
                return False
        elif key == "verifyingContract":
            if domain[key].lower() != wanted.lower():
                return False
        elif domain[key] != wanted:
            return False
    return True


def oracle_allows(rule: Mapping[str, Any], intent: SigningIntent, spent: int) -> bool:
    """Every constraint of ``rule``, spelled out once more from the documentation."""
    if rule["clients"] != ["*"] and intent.client_id not in rule["clients"]:
        return False
    if rule["key_labels"] != ["*"]:
        if intent.operation == "keys:create":
            if not intent.key_labels or not set(intent.key_labels) <= set(rule["key_labels"]):
                return False
        elif not set(rule["key_labels"]) & set(intent.key_labels):
            return False
    if intent.operation not in rule["operations"] or intent.chain not in rule["chains"]:
        return False
    if intent.operation == "sign:hash" and not rule.get("blind_signing", False):
        return False
    if "chain_ids" in rule:
        if intent.chain_id is None and intent.operation == "sign:transaction":
            return False
        if intent.chain_id is not None and intent.chain_id not in rule["chain_ids"]:
            return False
    if intent.operation == "sign:transaction" and intent.to is None:
        if not rule.get("allow_contract_creation", False):
            return False
    else:
        allowlist = [a.lower() for a in rule.get("to_allowlist", [])]
        if (
            intent.to is not None
            and "to_allowlist" in rule
            and "0x" + intent.to.hex() not in allowlist
        ):
            return False
        if intent.has_data:
            selectors = rule.get("contract_selectors", [])
            if intent.data_selector is None or "0x" + intent.data_selector.hex() not in selectors:
                return False
    if "max_value_per_tx" in rule and intent.value > int(rule["max_value_per_tx"]):
        return False
    if intent.operation == "sign:typed_data":
        domain = intent.eip712_domain
        if domain is None:
            return False
        if not any(domain_matches(p, domain) for p in rule.get("eip712_domains", [])):
            return False
    fee = intent.gas * intent.fee_per_gas
    if "max_fee_per_tx" in rule and fee > int(rule["max_fee_per_tx"]):
        return False
    if "max_fee_per_gas" in rule and intent.fee_per_gas > int(rule["max_fee_per_gas"]):
        return False
    limit = rule.get("max_value_per_window")
    counted = counted_by(rule, intent)
    return limit is None or counted == 0 or spent + counted <= int(limit)


def counted_by(rule: Mapping[str, Any], intent: SigningIntent) -> int:
    """What ``intent`` adds to ``rule``'s window: its value, and its worst-case fee (gas
    times price per gas) when the rule says ``count_fees_in_window = true``."""
    if rule.get("count_fees_in_window", False):
        return intent.value + intent.gas * intent.fee_per_gas
    return intent.value


@dataclass
class OracleLedger:
    """Committed spends as plain (time, rule, key, value) rows."""

    rows: list[tuple[float, str, str, int]] = field(default_factory=list)

    def spent(self, rule: Mapping[str, Any], key_id: str, now: float) -> int:
        window = rule.get("window_seconds", 86_400)
        return sum(
            value
            for at, name, key, value in self.rows
            if name == rule["name"] and key == key_id and now - window < at <= now
        )


@PROPERTY
@given(rules=policies(), intent=intents())
def test_allowed_exactly_when_some_rule_allows(
    rules: list[dict[str, Any]], intent: SigningIntent
) -> None:
    engine = PolicyEngine(Policy.from_bytes(to_toml(rules)), now=lambda: 0.0)
    decision = engine.check(intent)
    granting = [rule["name"] for rule in rules if oracle_allows(rule, intent, 0)]
    assert decision.allowed == bool(granting), decision.reason
    if granting:
        assert decision.rule == granting[0]
    elif decision.rule is not None:
        assert decision.reason.startswith(f"rule {decision.rule}: ")


@PROPERTY
@given(data=st.data(), rules=policies())
def test_no_intent_over_a_fee_cap_is_allowed(
    rules: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Intents aimed at the rules, their fees often just at or one wei over a cap: allowed
    exactly as the oracle says, and never with a fee or a price over the granting rule's."""
    intent = data.draw(intents(rules))
    decision = PolicyEngine(Policy.from_bytes(to_toml(rules)), now=lambda: 0.0).check(intent)
    granting = [rule for rule in rules if oracle_allows(rule, intent, 0)]
    assert decision.allowed == bool(granting), decision.reason
    if not decision.allowed:
        return
    (rule,) = [rule for rule in rules if rule["name"] == decision.rule]
    if "max_fee_per_tx" in rule:
        assert intent.gas * intent.fee_per_gas <= int(rule["max_fee_per_tx"])
    if "max_fee_per_gas" in rule:
        assert intent.fee_per_gas <= int(rule["max_fee_per_gas"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rules=policies())
def test_committed_spend_never_exceeds_any_window(
    rules: list[dict[str, Any]], data: st.DataObject
) -> None:
    step = st.tuples(
        st.sampled_from([0, 1, 2, 5, 10, 20]), intents(rules, key_ids=("k1", "k2")), st.booleans()
    )
    steps = data.draw(st.lists(step, min_size=1, max_size=40))
    now = 0.0
    engine = PolicyEngine(Policy.from_bytes(to_toml(rules)), now=lambda: now)
    ledger = OracleLedger()
    for advance, intent, signing_succeeds in steps:
        now += advance
        decision = engine.check(intent)
        granting = [
            rule
            for rule in rules
            if oracle_allows(rule, intent, ledger.spent(rule, intent.key_id, now))
        ]
        assert decision.allowed == bool(granting), decision.reason
        if not granting or not signing_succeeds:
            continue
        assert decision.rule == granting[0]["name"]
        engine.commit(decision, intent)
        counted = counted_by(granting[0], intent)
        if "max_value_per_window" in granting[0] and counted > 0:
            ledger.rows.append((now, granting[0]["name"], intent.key_id, counted))

    for rule in rules:
        if "max_value_per_window" not in rule:
            continue
        limit = int(rule["max_value_per_window"])
        for key_id in ("k1", "k2"):
            for at, *_ in ledger.rows:
                assert ledger.spent(rule, key_id, at) <= limit
                assert engine.spent(rule["name"], key_id) <= limit


@st.composite
def window_rules(draw: st.DrawFn, name: str) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": name,
        "clients": ["*"],
        "key_labels": ["*"],
        "operations": ["sign:transaction"],
        "chains": ["ethereum"],
        "max_value_per_window": draw(st.integers(0, 20)),
        "window_seconds": draw(st.integers(1, 12)),
    }
    if draw(st.booleans()):
        rule["max_value_per_tx"] = draw(st.integers(0, 12))
    if draw(st.booleans()):
        rule["count_fees_in_window"] = True
    if draw(st.booleans()):
        rule["max_fee_per_tx"] = draw(st.integers(0, 9))
    return rule


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(st.integers(), min_size=1, max_size=2).flatmap(
        lambda names: st.tuples(*(window_rules(f"w{n}") for n in range(len(names))))
    ),
    steps=st.lists(
        st.tuples(
            st.integers(0, 6),
            st.sampled_from(["k1", "k2"]),
            st.integers(0, 12),
            st.tuples(st.integers(0, 3), st.integers(0, 3)),
            st.booleans(),
        ),
        min_size=10,
        max_size=60,
    ),
)
def test_windows_under_heavy_spending(
    rules: tuple[dict[str, Any], ...],
    steps: list[tuple[int, str, int, tuple[int, int], bool]],
) -> None:
    """Many spends against one or two windowed rules, some counting fees: the engine agrees
    with the oracle at every step, and no window of any rule and key ever holds more than
    its maximum."""
    now = 0.0
    engine = PolicyEngine(Policy.from_bytes(to_toml(list(rules))), now=lambda: now)
    ledger = OracleLedger()
    for advance, key_id, value, (gas, price), signing_succeeds in steps:
        now += advance
        intent = SigningIntent(
            "c",
            key_id,
            [],
            "ethereum",
            "sign:transaction",
            to=ADDRESSES[0],
            value=value,
            gas=gas,
            fee_per_gas=price,
        )
        decision = engine.check(intent)
        granting = [r for r in rules if oracle_allows(r, intent, ledger.spent(r, key_id, now))]
        assert decision.allowed == bool(granting), decision.reason
        if granting and signing_succeeds:
            spend = engine.commit(decision, intent)
            counted = counted_by(granting[0], intent)
            assert (spend.value if spend else 0) == counted  # what the audit record keeps
            if counted > 0:
                ledger.rows.append((now, granting[0]["name"], key_id, counted))
    for rule in rules:
        for at, name, key_id, _ in ledger.rows:
            if name == rule["name"]:
                assert ledger.spent(rule, key_id, at) <= rule["max_value_per_window"]
