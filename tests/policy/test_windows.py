"""Spend windows: counted on commit only, sliding with an injectable clock, thread-safe."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from signd.errors import AccessDenied
from signd.policy import Policy, PolicyEngine, PolicyHolder
from tests.policy.conftest import ETHER, EXAMPLE_POLICY, NOW, FakeClock, hot_tx

DAY = 86_400


def spend(engine: PolicyEngine, value: int, **changes: object) -> None:
    """Check, "sign", commit: the enclave's sequence."""
    intent = hot_tx(value=value, **changes)
    decision = engine.check(intent)
    decision.raise_if_refused()
    engine.commit(decision, intent)


def test_window_fills_then_slides(engine: PolicyEngine, clock: FakeClock) -> None:
    spend(engine, ETHER)
    clock.now += 3600
    spend(engine, ETHER)
    spend(engine, ETHER)
    assert engine.spent("hot-eth", "k-hot-1") == 3 * ETHER
    decision = engine.check(hot_tx(value=1))
    assert decision.refused
    assert decision.reason == (
        "rule hot-eth: value 1 on top of 3000000000000000000 spent in the last 86400 s "
        "exceeds max_value_per_window 3000000000000000000"
    )
    clock.now = NOW + DAY - 1
    assert engine.check(hot_tx(value=1)).refused
    clock.now = NOW + DAY
    assert engine.spent("hot-eth", "k-hot-1") == 2 * ETHER
    spend(engine, ETHER)
    assert engine.check(hot_tx(value=1)).refused
    clock.now = NOW + 3600 + DAY
    assert engine.spent("hot-eth", "k-hot-1") == ETHER
    spend(engine, ETHER)
    spend(engine, ETHER)


def test_zero_value_is_never_blocked_by_a_full_window(engine: PolicyEngine) -> None:
    for _ in range(3):
        spend(engine, ETHER)
    spend(engine, 0)
    assert engine.check(hot_tx(value=0)).allowed


def test_checking_does_not_spend(engine: PolicyEngine) -> None:
    """Only commit (after the signature exists) counts: a failed signing burns nothing."""
    for _ in range(10):
        assert engine.check(hot_tx(value=ETHER)).allowed
    assert engine.spent("hot-eth", "k-hot-1") == 0
    spend(engine, ETHER)
    assert engine.spent("hot-eth", "k-hot-1") == ETHER


def test_commit_refuses_what_concurrent_commits_used_up(engine: PolicyEngine) -> None:
    spend(engine, ETHER)
    first, second = hot_tx(value=ETHER), hot_tx(value=ETHER, key_labels=["hot", "extra"])
    a, b, c = engine.check(first), engine.check(second), engine.check(first)
    assert a.allowed and b.allowed and c.allowed
    engine.commit(a, first)
    engine.commit(b, second)
    with pytest.raises(AccessDenied, match=r"rule hot-eth: value .* exceeds max_value_per_window"):
        engine.commit(c, first)
    assert engine.spent("hot-eth", "k-hot-1") == 3 * ETHER


def test_windows_are_per_key_and_per_rule(engine: PolicyEngine) -> None:
    for _ in range(3):
        spend(engine, ETHER)
    assert engine.check(hot_tx(value=1)).refused
    spend(engine, ETHER, key_id="k-hot-2")
    assert engine.spent("hot-eth", "k-hot-2") == ETHER
    deploy = {"client_id": "deployer", "chain_id": 11155111, "value": 10 * ETHER}
    spend(engine, 10 * ETHER, **{k: v for k, v in deploy.items() if k != "value"})
    assert engine.spent("deploy", "k-hot-1") == 0


def test_commit_misuse_is_refused(engine: PolicyEngine) -> None:
    refused_intent = hot_tx(value=5 * ETHER)
    refused = engine.check(refused_intent)
    with pytest.raises(AccessDenied, match="cannot commit a refused request: rule hot-eth"):
        engine.commit(refused, refused_intent)
    allowed = engine.check(hot_tx(value=1))
    with pytest.raises(AccessDenied, match="decision was made for a different request"):
        engine.commit(allowed, hot_tx(value=ETHER))
    assert engine.spent("hot-eth", "k-hot-1") == 0


def test_reload_between_check_and_commit_refuses_the_commit(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE_POLICY)
    holder = PolicyHolder.load(path)
    engine = PolicyEngine(holder, now=clock)
    intent = hot_tx(value=ETHER)
    decision = engine.check(intent)
    path.write_text(EXAMPLE_POLICY.replace('"3000000000000000000"', '"1"'))
    holder.reload()
    with pytest.raises(AccessDenied, match="reloaded while signing"):
        engine.commit(decision, intent)
    assert engine.check(intent).reason.endswith("exceeds max_value_per_window 1")


def test_spend_survives_reloading_the_same_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE_POLICY)
    holder = PolicyHolder.load(path)
    engine = PolicyEngine(holder, now=clock)
    for _ in range(3):
        spend(engine, ETHER)
    holder.reload()
    assert engine.check(hot_tx(value=1)).refused
    assert engine.spent("hot-eth", "k-hot-1") == 3 * ETHER


def test_a_clock_stepping_back_keeps_counting(engine: PolicyEngine, clock: FakeClock) -> None:
    clock.now = NOW + 1000
    for _ in range(3):
        spend(engine, ETHER)
    clock.now = NOW
    assert engine.check(hot_tx(value=1)).refused


def test_spent_for_rules_without_a_window(engine: PolicyEngine) -> None:
    assert engine.spent("deploy", "k") == 0
    assert engine.spent("no-such-rule", "k") == 0


def test_concurrent_spending_never_exceeds_the_window(clock: FakeClock) -> None:
    engine = PolicyEngine(Policy.from_bytes(EXAMPLE_POLICY.encode()), now=clock)
    committed: list[int] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(20):
            intent = hot_tx(value=ETHER // 4)
            decision = engine.check(intent)
            if decision.refused:
                continue
            try:
                engine.commit(decision, intent)
            except AccessDenied:
                continue
            committed.append(intent.value)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(committed) == 3 * ETHER
    assert engine.spent("hot-eth", "k-hot-1") == 3 * ETHER
