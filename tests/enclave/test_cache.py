"""The unsealed-key cache: age, use and size limits on every hit, flush, thread safety."""

from __future__ import annotations

import threading

import pytest

from signd.enclave.cache import UnsealedKeyCache
from signd.errors import InvalidField
from tests.enclave.fakes import FakeClock


def make(clock: FakeClock, **limits: float) -> UnsealedKeyCache[str, object]:
    return UnsealedKeyCache(now=clock, **limits)  # type: ignore[arg-type]


def test_a_miss_is_none_and_a_hit_returns_the_value() -> None:
    cache = make(FakeClock())
    value = object()
    assert cache.get("k") is None
    cache.put("k", value)
    assert cache.get("k") is value
    assert len(cache) == 1


def test_entries_expire_at_max_age_on_the_next_hit() -> None:
    clock = FakeClock()
    cache = make(clock, max_age=60.0)
    cache.put("k", "v")
    clock.advance(59.9)
    assert cache.get("k") == "v"
    clock.advance(0.1)
    assert cache.get("k") is None
    assert len(cache) == 0


def test_age_counts_from_unsealing_not_from_the_last_use() -> None:
    clock = FakeClock()
    cache = make(clock, max_age=10.0)
    cache.put("k", "v")
    for _ in range(9):
        clock.advance(1.0)
        assert cache.get("k") == "v"
    clock.advance(1.0)
    assert cache.get("k") is None


def test_an_entry_serves_at_most_max_uses_signatures_counting_the_first() -> None:
    cache = make(FakeClock(), max_uses=3)
    cache.put("k", "v")
    assert cache.get("k") == "v"
    assert cache.get("k") == "v"
    assert cache.get("k") is None
    assert len(cache) == 0


def test_max_uses_of_one_caches_nothing() -> None:
    cache = make(FakeClock(), max_uses=1)
    cache.put("k", "v")
    assert cache.get("k") is None
    assert len(cache) == 0


def test_size_limit_evicts_the_least_recently_used() -> None:
    cache = make(FakeClock(), max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3


def test_zero_entries_disables_caching() -> None:
    cache = make(FakeClock(), max_entries=0)
    cache.put("a", 1)
    assert cache.get("a") is None


def test_putting_again_resets_age_and_uses() -> None:
    clock = FakeClock()
    cache = make(clock, max_age=10.0, max_uses=2)
    cache.put("k", "old")
    clock.advance(9.0)
    cache.put("k", "new")
    clock.advance(5.0)
    assert cache.get("k") == "new"
    assert cache.get("k") is None


def test_flush_drops_everything() -> None:
    cache = make(FakeClock())
    for name in "abc":
        cache.put(name, name)
    assert cache.flush() == 3
    assert len(cache) == 0
    assert cache.get("a") is None


def test_expired_entries_are_swept_without_being_hit() -> None:
    clock = FakeClock()
    cache = make(clock, max_age=10.0)
    cache.put("a", 1)
    cache.put("b", 2)
    clock.advance(10.0)
    assert cache.evict_expired() == 2
    cache.put("c", 3)
    clock.advance(10.0)
    cache.put("d", 4)
    assert len(cache) == 1
    assert cache.get("d") == 4


def test_repr_shows_limits_not_values() -> None:
    cache = make(FakeClock())
    cache.put("k", "very-secret-value")
    assert "very-secret-value" not in repr(cache)
    assert "very-secret-value" not in repr(cache._entries)


@pytest.mark.parametrize(
    "limits", [{"max_age": 0.0}, {"max_uses": 0}, {"max_entries": -1}], ids=str
)
def test_limits_are_validated(limits: dict[str, float]) -> None:
    with pytest.raises(InvalidField):
        make(FakeClock(), **limits)


def test_concurrent_hits_never_exceed_max_uses() -> None:
    cache = make(FakeClock(), max_uses=500, max_entries=10)
    cache.put("k", "v")
    hits = []
    lock = threading.Lock()

    def worker() -> None:
        count = sum(1 for _ in range(200) if cache.get("k") == "v")
        with lock:
            hits.append(count)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(hits) == 499
