"""Unsealed private keys kept in enclave memory, with limits on age, uses and count.

Unsealing costs a blob read and a KMS round trip, so a key signed with often stays unsealed for
a while. Every limit is checked on every hit (as in aws-encryption-sdk's caching materials
manager): an entry older than ``max_age`` seconds or already served ``max_uses`` times is
dropped and the caller unseals again. ``max_entries`` bounds memory; the least recently used
entry goes first. Nothing is loaded up front, so start-up never walks the key store.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from signd.errors import InvalidField

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    unsealed_at: float
    uses: int

    def __repr__(self) -> str:
        return f"_Entry(unsealed_at={self.unsealed_at}, uses={self.uses})"


class UnsealedKeyCache(Generic[K, V]):
    """A thread-safe LRU of unsealed keys with age, use and size limits.

    :meth:`put` counts as the first use (the caller just unsealed the key to sign with it);
    :meth:`get` counts one more, so an entry serves at most ``max_uses`` signatures in all.
    ``now`` is the clock (monotonic seconds), injectable so tests need no sleeping.
    """

    def __init__(
        self,
        *,
        max_age: float = 300.0,
        max_uses: int = 1000,
        max_entries: int = 10_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age <= 0:
            raise InvalidField("max_age must be positive", field="max_age")
        if max_uses < 1:
            raise InvalidField("max_uses must be at least 1", field="max_uses")
        if max_entries < 0:
            raise InvalidField("max_entries must not be negative", field="max_entries")
        self.max_age = max_age
        self.max_uses = max_uses
        self.max_entries = max_entries
        self._now = now
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep = now()

    def __repr__(self) -> str:
        return (
            f"UnsealedKeyCache(entries={len(self)}, max_age={self.max_age}, "
            f"max_uses={self.max_uses}, max_entries={self.max_entries})"
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: K) -> V | None:
        """The cached value, counting one use; ``None`` if absent, too old or used up."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._expired(entry, self._now()) or entry.uses >= self.max_uses:
                del self._entries[key]
                return None
            entry.uses += 1
            self._entries.move_to_end(key)
            return entry.value

    def holds(self, key: K, uses: int = 1) -> bool:
        """Whether :meth:`get` would serve ``key`` ``uses`` more times now (nothing counted)."""
        with self._lock:
            entry = self._entries.get(key)
            return (
                entry is not None
                and not self._expired(entry, self._now())
                and entry.uses + uses <= self.max_uses
            )

    def put(self, key: K, value: V) -> None:
        """Cache a freshly unsealed value (its first use), evicting to stay within limits."""
        with self._lock:
            now = self._now()
            if now - self._last_sweep >= self.max_age:
                self._evict_expired(now)
            if self.max_entries == 0 or self.max_uses == 1:
                self._entries.pop(key, None)
                return
            self._entries[key] = _Entry(value, now, uses=1)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def evict_expired(self) -> int:
        """Drop every entry past its age; the number dropped."""
        with self._lock:
            return self._evict_expired(self._now())

    def flush(self) -> int:
        """Drop everything; the number of entries dropped."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def _expired(self, entry: _Entry[V], now: float) -> bool:
        return now - entry.unsealed_at >= self.max_age

    def _evict_expired(self, now: float) -> int:
        self._last_sweep = now
        stale = [key for key, entry in self._entries.items() if self._expired(entry, now)]
        for key in stale:
            del self._entries[key]
        return len(stale)
