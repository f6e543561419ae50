"""Deadlines checked by one timer per event loop (:mod:`signd.api.deadlines`): kept never
early and at most a tick late, a cancellation from elsewhere left as it is, and nothing
left behind. On asyncio's own loop and on uvloop (what ``signd serve`` runs)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from signd.api import deadlines
from signd.api.deadlines import TICK, within

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def pending(loop: asyncio.AbstractEventLoop) -> int:
    watched = deadlines._deadlines.existing(loop)
    return 0 if watched is None else len(watched._due) + len(watched._expired)


@LOOPS
def test_a_wait_past_its_deadline_times_out_not_early_and_at_most_a_tick_late(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with within(0.25):
                await asyncio.sleep(5)
        waited = time.monotonic() - started
        assert pending(asyncio.get_running_loop()) == 0
        return waited

    waited = run(main())
    assert 0.25 <= waited <= 0.25 + TICK + 0.1, waited


@LOOPS
def test_a_wait_done_in_time_leaves_nothing_behind(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def main() -> str:
        async with within(0.2):
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        assert pending(loop) == 0
        await asyncio.sleep(0.2 + 2 * TICK)  # past the deadline: no late cancellation
        watched = deadlines._deadlines.existing(loop)
        assert watched is not None
        assert not watched._sweeping  # the timer stops once nothing is noted
        return "done"

    assert run(main()) == "done"


@LOOPS
def test_many_waits_each_keep_their_own_deadline(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def wait(seconds: float, work: float) -> str:
        try:
            async with within(seconds):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timed out"
        return "done"

    async def main() -> list[str]:
        cases = [(0.15, 0.01), (0.15, 1.0), (0.4, 0.2), (0.2, 1.0), (1.0, 0.05)]
        results = await asyncio.gather(*(wait(*case) for case in cases))
        assert pending(asyncio.get_running_loop()) == 0
        return results

    assert run(main()) == ["done", "timed out", "done", "timed out", "done"]


@LOOPS
def test_a_cancellation_from_elsewhere_stays_a_cancellation(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def waiter() -> None:
        async with within(5):
            await asyncio.sleep(5)

    async def main() -> None:
        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pending(asyncio.get_running_loop()) == 0

    run(main())


@LOOPS
def test_a_cancellation_from_elsewhere_wins_over_an_expired_deadline(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    """As with :func:`asyncio.timeout`: the task was asked to stop, so it stops."""

    async def waiter() -> None:
        async with within(0.05):
            try:
                await asyncio.sleep(5)
            finally:
                await asyncio.sleep(0.3)  # shielded long enough for both cancellations
                asyncio.current_task().cancel()  # type: ignore[union-attr]

    async def main() -> None:
        task = asyncio.ensure_future(waiter())
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
