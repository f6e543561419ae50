"""Spend windows rebuilt from replayed spends, each at its own time."""

from __future__ import annotations

import pytest

from signd.audit.records import Spend
from signd.policy import Operation, Policy, PolicyEngine, SigningIntent, SpendWindowsUnavailable

POLICY = b"""
version = 1

[[rules]]
name = "daily"
clients = ["alice"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
max_value_per_window = "100"
window_seconds = 3600

[[rules]]
name = "messages"
clients = ["alice"]
key_labels = ["hot"]
operations = ["sign:message"]
chains = ["ethereum"]
"""
NOW = 1_700_000_000.0


def intent(value: int, operation: Operation = Operation.SIGN_TRANSACTION) -> SigningIntent:
    return SigningIntent(
        "alice",
        "key-1",
        frozenset({"hot"}),
        "ethereum",
        operation,
        chain_id=1,
        to=b"\x35" * 20,
        value=value,
    )


def engine() -> PolicyEngine:
    return PolicyEngine(Policy.from_bytes(POLICY), now=lambda: NOW)


def test_commit_returns_the_spend_it_counted() -> None:
    policy = engine()
    decision = policy.check(intent(40))
    assert policy.commit(decision, intent(40)) == Spend("daily", "key-1", 40)
    assert policy.commit(policy.check(intent(0)), intent(0)) is None
    message = intent(0, Operation.SIGN_MESSAGE)
    assert policy.commit(policy.check(message), message) is None
    assert policy.longest_window == 3600


def test_replayed_spends_count_at_their_own_time() -> None:
    policy = engine()
    policy.replay(
        [
            (NOW - 3599, Spend("daily", "key-1", 60)),
            (NOW - 3600, Spend("daily", "key-1", 1000)),  # slid out of the window
            (NOW - 10, Spend("daily", "key-2", 1000)),  # another key's window
        ]
    )
    assert policy.spent("daily", "key-1") == 60
    assert policy.check(intent(40)).allowed
    refused = policy.check(intent(41))
    assert refused.refused and refused.rule == "daily"
    assert "on top of 60 spent" in refused.reason


def test_windows_awaiting_replay_refuse_rather_than_undercount() -> None:
    policy = engine()
    policy.await_replay("the tail is incomplete")
    assert not policy.windows_ready
    with pytest.raises(SpendWindowsUnavailable, match=r"rule daily: .*the tail is incomplete"):
        policy.check(intent(1))
    assert policy.check(intent(0)).allowed  # moves no value: no window involved
    assert policy.check(intent(0, Operation.SIGN_MESSAGE)).allowed
    policy.replay([(NOW - 1, Spend("daily", "key-1", 100))], complete=False)
    with pytest.raises(SpendWindowsUnavailable):
        policy.check(intent(1))
    policy.replay([])
    assert policy.windows_ready
    assert policy.check(intent(1)).refused
