"""One object per event loop, made on first use and dropped with its loop."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """``make(loop)`` once per event loop: what a loop's requests share (one timer, one
    wake-up); weakly keyed, so a closed loop takes its object with it."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, loop: asyncio.AbstractEventLoop) -> T:
        """``loop``'s object, made now if it has none."""
        made = self._made.get(loop)
        if made is None:
            made = self._made[loop] = self._make(loop)
        return made

    def existing(self, loop: asyncio.AbstractEventLoop) -> T | None:
        """``loop``'s object if it was made, else ``None`` (nothing made)."""
        return self._made.get(loop)
