"""The nonce tracker: a per-client quota of live nonces, exact replay refusal in a compact
store, checked against a plain reference model on random sequences."""

from __future__ import annotations

import gc
import hashlib
import os
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from signd.auth import ClientsRegistry, RequestVerifier, sign_request
from signd.auth.request_signing import NonceTracker, PrivateKey, default_nonce_quota
from signd.errors import AccessDenied, ConfigurationError
from tests.auth.conftest import NOW, FakeClock

PATH = "/v1/keys"
WINDOW = 300


def signed(client_id: str, key: PrivateKey, *, now: float = NOW) -> dict[str, str]:
    return sign_request("GET", PATH, b"", client_id, key, now=now)


@pytest.fixture
def quota_verifier(registry: ClientsRegistry, clock: FakeClock) -> RequestVerifier:
    return RequestVerifier(
        registry, window=WINDOW, now=clock, nonce_capacity=100, nonce_quota=3, not_before=0
    )


def test_a_client_at_its_quota_is_refused_while_another_client_passes(
    quota_verifier: RequestVerifier,
    ed_key: ed25519.Ed25519PrivateKey,
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    for _ in range(3):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    with pytest.raises(AccessDenied, match="'wallet-hot' has too many requests in the time window"):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    principal = quota_verifier.verify("GET", PATH, b"", signed("mobile", p256_key))
    assert principal.client_id == "mobile"


def test_a_replay_is_refused_as_a_replay_at_the_quota_and_below_it(
    quota_verifier: RequestVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    first = signed("wallet-hot", ed_key)
    quota_verifier.verify("GET", PATH, b"", first)
    with pytest.raises(AccessDenied, match="replayed request"):
        quota_verifier.verify("GET", PATH, b"", first)
    for _ in range(2):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    with pytest.raises(AccessDenied, match="replayed request"):
        quota_verifier.verify("GET", PATH, b"", first)


def test_expiry_frees_a_clients_quota(
    quota_verifier: RequestVerifier, clock: FakeClock, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key, now=NOW - 100))
    for _ in range(2):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    with pytest.raises(AccessDenied, match="too many requests"):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    clock.now = NOW + WINDOW - 99  # the first request's timestamp has left the window
    quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key, now=clock.now))
    with pytest.raises(AccessDenied, match="too many requests"):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key, now=clock.now))


def test_the_default_quota_is_a_quarter_of_the_capacity(
    registry: ClientsRegistry, clock: FakeClock, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    assert default_nonce_quota(1_000_000) == 250_000
    assert default_nonce_quota(3) == 1
    verifier = RequestVerifier(registry, now=clock, nonce_capacity=16, not_before=0)
    for _ in range(4):
        verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    with pytest.raises(AccessDenied, match="a quota of 4 live nonces"):
        verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))


def test_a_quota_is_raised_by_limiting_the_nonces_anew(
    quota_verifier: RequestVerifier, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    for _ in range(3):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    quota_verifier.limit_nonces(100, 4)
    quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))
    with pytest.raises(AccessDenied, match="too many requests"):
        quota_verifier.verify("GET", PATH, b"", signed("wallet-hot", ed_key))


@pytest.mark.parametrize(("capacity", "quota"), [(0, 1), (10, 0), (10, 11)])
def test_bounds_out_of_range_are_refused(capacity: int, quota: int) -> None:
    with pytest.raises(ConfigurationError):
        NonceTracker(capacity=capacity, per_client=quota)


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


@pytest.mark.parametrize("clients", [10, 1000])
def test_a_live_nonce_costs_a_small_fraction_of_a_kilobyte(clients: int) -> None:
    """Measured with tracemalloc, with each request's strings made afresh as a verifier
    receives them, 100 requests a second from ``clients`` clients (with 1000, one request
    per client and second): about 110 bytes a nonce (per-nonce records took about 900)."""
    count = 20_000
    tracker = NonceTracker(capacity=count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            tracker.remember(
                f"client-{n % clients}",
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
    and both hold the same live nonces, per client too, as time goes by. Requests once made
    are presented again and their calls performed, in part or in full, to reach the states
    where replays and follow-ups differ."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.live: dict[tuple[str, str], Seen] = {}
        self.capacity = 1
        self.quota = 1
        self.tracker = NonceTracker(capacity=1)

    @initialize(capacity=st.integers(1, 8), data=st.data())
    def bounds(self, capacity: int, data: st.DataObject) -> None:
        self.capacity, self.quota = capacity, data.draw(st.integers(1, capacity))
        self.tracker = NonceTracker(capacity=self.capacity, per_client=self.quota)

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
            mine = sum(1 for client, _ in self.live if client == request.client)
            expected = len(self.live) < self.capacity and mine < self.quota
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

    @rule(data=st.data())
    def relimit(self, data: st.DataObject) -> None:
        self.capacity = data.draw(st.integers(1, 8))
        self.quota = data.draw(st.integers(1, self.capacity))
        self.tracker.limit(self.capacity, self.quota)

    @invariant()
    def same_live_nonces(self) -> None:
        """Both forget expired nonces at the start of each remember and perform."""
        assert len(self.tracker) == len(self.live)
        for client in CLIENTS:
            assert self.tracker.live(client) == sum(1 for c, _ in self.live if c == client)


TrackerMatchesModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrackerMatchesModel = TrackerMatchesModel.TestCase
