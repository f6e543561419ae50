"""The nonce tracker: exact replay refusal in a compact store, checked against a plain
reference model on random sequences."""

from __future__ import annotations

import gc
import hashlib
import os
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from signd.auth.request_signing import NonceTracker
from signd.errors import AccessDenied


def test_client_and_nonce_are_told_apart_however_they_are_split() -> None:
    tracker = NonceTracker(capacity=10)
    tracker.remember("a", "b" + "00" * 16, expires_at=10, now=0)
    tracker.remember("ab", "00" * 16, expires_at=10, now=0)
    tracker.remember("ab0", "0" + "00" * 15, expires_at=10, now=0)
    assert len(tracker) == 3


def test_a_digest_collision_refuses_a_fresh_nonce_and_never_admits_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were two (client, nonce) pairs ever to share a digest, the second would be refused
    as a replay: the store errs towards refusing, never towards accepting."""
    tracker = NonceTracker(capacity=10)
    monkeypatch.setattr(tracker, "_digest", lambda client_id, nonce: b"\x00" * 16)
    tracker.remember("a", "11" * 16, expires_at=10, now=0)
    with pytest.raises(AccessDenied, match="replayed request"):
        tracker.remember("b", "22" * 16, expires_at=10, now=0)
    with pytest.raises(AccessDenied, match="replayed request"):
        tracker.remember("a", "11" * 16, expires_at=10, now=0)


def test_a_live_nonce_costs_a_small_fraction_of_a_kilobyte() -> None:
    """Measured with tracemalloc, with each request's strings made afresh as a verifier
    receives them: about 105 bytes a nonce (per-nonce records took about 950)."""
    count = 20_000
    tracker = NonceTracker(capacity=count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            tracker.remember(
                f"client-{n % 10}",
                os.urandom(16).hex(),
                expires_at=1000 + n // 100,
                now=0,
                body_sha256=hashlib.sha256(b"").digest(),
            )
        gc.collect()
        per_nonce = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(tracker) == count
    assert per_nonce < 250, f"{per_nonce:.0f} bytes per live nonce"


# The reference model: a plain dict of every live (client, nonce) with what it was seen with.

CLIENTS = ("a", "ab", "b")
NONCES = ("n0", "bn0", "n1", "n2")
"""Few clients and nonces, so that sequences meet replays, quotas and splits like
("a", "bn0") / ("ab", "n0")."""
CALLS = ("0", "1", "2")
BODIES = (b"", b"x" * 32)


@dataclass(frozen=True)
class Request:
    """A request as presented: who, its nonce, body and calls (None: authentication only)."""

    client: str
    nonce: str
    body: bytes
    calls: frozenset[str] | None


@dataclass
class Seen:
    expires_at: float
    body: bytes
    calls: frozenset[str]
    performed: set[str] = field(default_factory=set)


class TrackerMatchesModel(RuleBasedStateMachine):
    """Every remember/perform is accepted by the tracker exactly when the model accepts it,
    and both hold as many live nonces, as time goes by. Requests once made
    are presented again and their calls performed, in part or in full, to reach the states
    where replays and follow-ups differ."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.live: dict[tuple[str, str], Seen] = {}
        self.capacity = 1
        self.tracker = NonceTracker(capacity=1)

    @initialize(capacity=st.integers(1, 8))
    def bounds(self, capacity: int) -> None:
        self.capacity = capacity
        self.tracker = NonceTracker(capacity=capacity)

    def expire(self) -> None:
        self.live = {k: v for k, v in self.live.items() if not v.expires_at < self.now}

    @staticmethod
    def accepted(attempt: Callable[[], None]) -> bool:
        try:
            attempt()
        except AccessDenied:
            return False
        return True

    def present(self, request: Request, ttl: float, follow_up: bool) -> None:
        self.expire()
        seen = self.live.get((request.client, request.nonce))
        if seen is not None:
            expected = (
                request.calls is not None
                and follow_up
                and seen.body == request.body
                and not seen.performed >= seen.calls
            )
        else:
            expected = len(self.live) < self.capacity
            if expected:
                calls = frozenset(request.calls or ())
                self.live[(request.client, request.nonce)] = Seen(
                    self.now + ttl, request.body, calls
                )
        got = self.accepted(
            lambda: self.tracker.remember(
                request.client,
                request.nonce,
                expires_at=self.now + ttl,
                now=self.now,
                body_sha256=request.body,
                calls=request.calls,
                follow_up=follow_up,
            )
        )
        assert got == expected

    def perform(self, request: Request, wanted: frozenset[str]) -> None:
        self.expire()
        seen = self.live.get((request.client, request.nonce))
        expected = seen is not None and wanted <= seen.calls and wanted.isdisjoint(seen.performed)
        if expected and seen is not None:
            seen.performed |= wanted
        got = self.accepted(
            lambda: self.tracker.perform(request.client, request.nonce, wanted, now=self.now)
        )
        assert got == expected

    @rule(seconds=st.sampled_from([0, 0.5, 1, 3, 7]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(
        target=requests,
        client=st.sampled_from(CLIENTS),
        nonce=st.sampled_from(NONCES),
        body=st.sampled_from(BODIES),
        calls=st.none() | st.frozensets(st.sampled_from(CALLS)),
        ttl=st.sampled_from([-1, 0, 0.5, 1, 2, 5, 10]),
        follow_up=st.booleans(),
    )
    def new_request(
        self,
        client: str,
        nonce: str,
        body: bytes,
        calls: frozenset[str] | None,
        ttl: float,
        follow_up: bool,
    ) -> Request:
        request = Request(client, nonce, body, calls)
        self.present(request, ttl, follow_up)
        return request

    @rule(
        request=requests,
        ttl=st.sampled_from([0, 5]),
        follow_up=st.booleans(),
        other_body=st.booleans(),
        without_calls=st.booleans(),
    )
    def present_again(
        self, request: Request, ttl: float, follow_up: bool, other_body: bool, without_calls: bool
    ) -> None:
        if other_body:
            request = replace(request, body=BODIES[request.body == BODIES[0]])
        if without_calls:
            request = replace(request, calls=None)
        self.present(request, ttl, follow_up)

    @rule(request=requests, wanted=st.frozensets(st.sampled_from(CALLS)))
    def perform_some(self, request: Request, wanted: frozenset[str]) -> None:
        self.perform(request, wanted)

    @rule(request=requests)
    def perform_the_rest(self, request: Request) -> None:
        seen = self.live.get((request.client, request.nonce))
        rest = (seen.calls - seen.performed) if seen else frozenset(request.calls or ())
        self.perform(request, frozenset(rest))

    @invariant()
    def same_live_nonces(self) -> None:
        """Both forget expired nonces at the start of each remember and perform."""
        assert len(self.tracker) == len(self.live)


TrackerMatchesModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrackerMatchesModel = TrackerMatchesModel.TestCase
