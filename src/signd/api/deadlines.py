"""Deadlines for many short waits, checked by one timer per event loop.

Every request reads its body within ``body_timeout``. :func:`asyncio.timeout` arms and
disarms a timer per wait, which costs ≈ 5.6 µs on uvloop here (a timer handle in and out of
the loop's heap), against ≈ 73 µs for a bare Starlette endpoint in all, while a request's
deadline almost never passes. :func:`within` instead notes the task's deadline in a dictionary,
and one timer per loop, running every :data:`TICK` seconds while any wait is noted, cancels
the tasks past theirs. A deadline is thus kept to within :data:`TICK` late, never early;
the cancellation is turned into :class:`TimeoutError` as :func:`asyncio.timeout` does (and
a cancellation from elsewhere stays one).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Final

from signd.api.loops import PerLoop

TICK: Final = 0.1
"""Seconds between checks while a wait is noted: how late a deadline may be kept."""


class _LoopDeadlines:
    """The deadlines of one event loop's waits."""

    __slots__ = ("_due", "_expired", "_loop", "_sweeping")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeping = False

    def start(self, task: asyncio.Task[Any], seconds: float) -> None:
        self._due[task] = self._loop.time() + seconds
        if not self._sweeping:
            self._sweeping = True
            self._loop.call_later(TICK, self._sweep)

    def end(self, task: asyncio.Task[Any]) -> bool:
        """Forget ``task``'s deadline; whether it had passed (and the task was cancelled)."""
        if self._due.pop(task, None) is not None:
            return False
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _sweep(self) -> None:
        now = self._loop.time()
        for task, due in list(self._due.items()):
            if due <= now:
                del self._due[task]
                self._expired.add(task)
                task.cancel()
        if self._due:
            self._loop.call_later(TICK, self._sweep)
        else:
            self._sweeping = False


_deadlines: PerLoop[_LoopDeadlines] = PerLoop(_LoopDeadlines)


class within:  # noqa: N801 - used as asyncio.timeout is: async with within(seconds)
    """:func:`asyncio.timeout` for the current task, kept to within :data:`TICK` seconds
    late."""

    __slots__ = ("_cancelling", "_deadlines", "_seconds", "_task")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline is for a task")
        self._task = task
        self._deadlines = _deadlines(asyncio.get_running_loop())
        self._cancelling = task.cancelling()
        self._deadlines.start(task, self._seconds)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        expired = self._deadlines.end(self._task)
        if expired and kind is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from error
