"""Requests delivered twice, answered once: the answers of recent requests, by sender and id.

MQTT QoS 1 delivers at least once: the broker delivers a request again when its
acknowledgement was lost, and a device publishes it again when its answer was. Performing the
copy again would sign again and count the spend twice (a bearer token), or be refused as a
replay after the success (a request signature). :class:`RecentAnswers` performs the first copy
only; the others get its answer::

    answer, repeated = await answers.answer_once(key, fingerprint, perform)

- a copy of a request whose answer is remembered gets that answer, without ``perform``;
- a copy of a request still being performed waits for its answer;
- an id used with another ``fingerprint`` (another payload or reply target) raises
  :class:`~signd.api.errors.DuplicateRequest`;
- only final answers are remembered (``perform`` says which): a success, or a refusal that
  asking again cannot change (:func:`is_final_refusal`). A dependency fault or a rate limit
  is not, so that a device can ask again.

Answers are remembered for ``window`` seconds, at most ``most`` of them and
:data:`MAX_REMEMBERED_BYTES` in all, the oldest forgotten first. Not locked: one event loop
uses it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from signd.api.errors import DuplicateRequest
from signd.errors import DependencyUnavailable

Answer = dict[str, Any]

MAX_REMEMBERED_BYTES: Final = 64 * 1024 * 1024
"""Most bytes of remembered answers (as JSON): a signed transaction may be as large as its
request, so a count alone does not bound the memory."""
RETRYABLE_REFUSALS: Final = frozenset({401, 429})
"""4xx answers that another copy may not get: credentials (which are not compared) may be
fixed, and a rate limit passes."""


def is_final_refusal(http_status: int) -> bool:
    """Whether a refusal is the request's answer for good: a 4xx other than 401 and 429.
    5xx (a dependency fault, a bug) are not: the device should be able to ask again."""
    return 400 <= http_status < 500 and http_status not in RETRYABLE_REFUSALS


@dataclass(slots=True)
class _InFlight:
    fingerprint: Hashable
    done: anyio.Event = field(default_factory=anyio.Event)
    answer: Answer | None = None


@dataclass(frozen=True, slots=True)
class _Remembered:
    fingerprint: Hashable
    answer: Answer
    size: int
    expires: float


class RecentAnswers:
    """The answers of recent requests by key (who sent it, its id), for their copies."""

    def __init__(
        self,
        window: float,
        most: int,
        *,
        max_bytes: int = MAX_REMEMBERED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.most = most
        self.max_bytes = max_bytes
        self._clock = clock
        self._in_flight: dict[Hashable, _InFlight] = {}
        self._remembered: OrderedDict[Hashable, _Remembered] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        """How many answers are remembered."""
        self._forget_expired()
        return len(self._remembered)

    async def answer_once(
        self,
        key: Hashable,
        fingerprint: Hashable,
        perform: Callable[[], Awaitable[tuple[Answer, bool]]],
    ) -> tuple[Answer, bool]:
        """The answer to the request ``key`` names, and whether it is an earlier copy's.

        ``perform`` answers the first copy and says whether the answer is final. Raises
        :class:`~signd.api.errors.DuplicateRequest` when ``key`` is remembered or in flight
        with another ``fingerprint``, and :class:`~signd.errors.DependencyUnavailable` when
        the copy this one waited for was abandoned unanswered (signd stopping).
        """
        self._forget_expired()
        remembered = self._remembered.get(key)
        if remembered is not None:
            self._check(remembered.fingerprint, fingerprint)
            return remembered.answer, True
        in_flight = self._in_flight.get(key)
        if in_flight is not None:
            self._check(in_flight.fingerprint, fingerprint)
            await in_flight.done.wait()
            if in_flight.answer is None:
                raise DependencyUnavailable("the first copy of this request was not answered")
            return in_flight.answer, True
        in_flight = self._in_flight[key] = _InFlight(fingerprint)
        try:
            answer, final = await perform()
            in_flight.answer = answer
        finally:
            del self._in_flight[key]
            in_flight.done.set()
        if final:
            self._remember(key, fingerprint, answer)
        return answer, False

    def _check(self, known: Hashable, fingerprint: Hashable) -> None:
        if known != fingerprint:
            raise DuplicateRequest(
                f"this id was used by another request (another payload or reply target) in "
                f"the last {self.window:g} s; give a new request a new id",
                field="id",
            )

    def _remember(self, key: Hashable, fingerprint: Hashable, answer: Answer) -> None:
        size = len(json.dumps(answer, separators=(",", ":")))
        self._remembered[key] = _Remembered(fingerprint, answer, size, self._clock() + self.window)
        self._bytes += size
        while self._remembered and (
            len(self._remembered) > self.most or self._bytes > self.max_bytes
        ):
            self._forget_oldest()

    def _forget_expired(self) -> None:
        """Forget answers past their window; they are in order of expiry (one window, one
        monotonic clock), so the expired ones are the first."""
        now = self._clock()
        while self._remembered and next(iter(self._remembered.values())).expires <= now:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, oldest = self._remembered.popitem(last=False)
        self._bytes -= oldest.size
