"""Single signing requests that arrive together go through the gate together.

Under load, many requests reach the service in one pass of the event loop, each with one
signature to make. :class:`Gathering` holds them until the next pass begins and hands them
to the gate in one call (``sign_each_async``): the gate still decides on each request by
itself, in arrival order, with decisions and audit records of its own; what the requests
share is the call's fixed costs (its set-up, one durable audit write, one wake-up of the
waiting requests) and, when there are many, signatures made on every core
(:mod:`signd.gate.together`). Nothing waits for a timer: a request alone on an idle service
is handed over at the next pass, as soon as the loop is free.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

from signd.errors import IntegrityError
from signd.gate import Signed, SigningCall

P = TypeVar("P")
"""Who asks (the service's principal)."""

Outcome = Signed | Exception
"""A call's :class:`Signed`, or the error that refused it."""

SignEach = Callable[
    [Sequence[tuple[P, Sequence[SigningCall]]]],
    Awaitable[Sequence[Sequence[Outcome] | Exception]],
]
"""Signs each request (its principal and calls) in one gate call: each request's outcomes,
or the error its gate call met as a whole."""

MAX_GATHERED: Final = 256
"""The most requests handed to the gate in one call; more arriving in one pass go in the
next call (a gate call runs on the event loop, so this bounds how long it holds it)."""


class Gathering(Generic[P]):
    """Gathers one-call signing requests per pass of the event loop (see the module)."""

    __slots__ = ("_pending", "_sign_each", "_tasks")

    def __init__(self, sign_each: SignEach[P]) -> None:
        self._sign_each = sign_each
        self._pending: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, list[tuple[P, SigningCall, asyncio.Future[Outcome]]]
        ] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        """The hand-overs under way (the loop keeps only weak references to tasks)."""

    async def sign(self, principal: P, call: SigningCall) -> Outcome:
        """``call``'s outcome, once the gate call it was gathered into is over."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append((principal, call, future))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        gathered = self._pending.pop(loop, [])
        for start in range(0, len(gathered), MAX_GATHERED):
            # A context of its own: the call is no one request's (nothing of the first
            # request's context, such as deferred audit appends, carries over).
            task = loop.create_task(
                self._sign(gathered[start : start + MAX_GATHERED]), context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sign(
        self, gathered: Sequence[tuple[P, SigningCall, asyncio.Future[Outcome]]]
    ) -> None:
        gathered = [each for each in gathered if not each[2].done()]  # not for one cancelled
        if not gathered:
            return
        try:
            answers = await self._sign_each(
                [(principal, (call,)) for principal, call, _ in gathered]
            )
        except Exception as exc:  # the gate call failed as a whole: every request gets it
            answers = [exc for _ in gathered]
        except BaseException:  # cancelled: so is every request waiting for it
            for *_, future in gathered:
                future.cancel()
            raise
        if len(answers) != len(gathered):  # a gate's fault: no request may wait forever
            fault = IntegrityError(f"the gate answered {len(answers)} of {len(gathered)} requests")
            answers = [fault for _ in gathered]
        for (*_, future), answer in zip(gathered, answers, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            future.set_result(answer if isinstance(answer, Exception) else answer[0])
