"""The gathering of single signing requests (:mod:`signd.api.gathering`), with a gate that
records what it is handed."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from signd.api.gathering import MAX_GATHERED, Gathering, Outcome
from signd.errors import DependencyUnavailable, IntegrityError
from signd.gate import Signed, SigningCall, SigningKind
from signd.gate.errors import OutOfScope

Requests = Sequence[tuple[str, Sequence[SigningCall]]]


def call(number: int) -> SigningCall:
    return SigningCall(SigningKind.HASH, f"key-{number}", bytes([number % 256]) * 32)


class RecordingGate:
    """Answers each request with its call's payload (a stand-in for a signature), refuses
    the principal ``mallory``, and records the requests of each call."""

    def __init__(self, *, fail: BaseException | None = None, pause: bool = False) -> None:
        self.handed: list[list[tuple[str, SigningCall]]] = []
        self.fail = fail
        self.pause = pause

    async def sign_each(self, requests: Requests) -> list[Sequence[Outcome] | Exception]:
        self.handed.append([(who, calls[0]) for who, calls in requests])
        if self.pause:
            await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        return [
            OutOfScope(f"{who} may not") if who == "mallory" else [_signed(calls[0])]
            for who, calls in requests
        ]


def _signed(made: SigningCall) -> Signed:
    return Signed(None, made.payload)  # type: ignore[arg-type]


def test_requests_made_in_one_pass_go_in_one_call_in_order() -> None:
    gate = RecordingGate()
    gathering = Gathering(gate.sign_each)

    async def main() -> list[Outcome]:
        return await asyncio.gather(
            *(gathering.sign("mallory" if n == 2 else "alice", call(n)) for n in range(5))
        )

    outcomes = asyncio.run(main())
    assert gate.handed == [[("mallory" if n == 2 else "alice", call(n)) for n in range(5)]]
    refused = outcomes.pop(2)
    assert isinstance(refused, OutOfScope)
    assert [o.result for o in outcomes if isinstance(o, Signed)] == [
        call(n).payload for n in (0, 1, 3, 4)
    ]


def test_a_request_after_the_hand_over_goes_in_the_next_call() -> None:
    gate = RecordingGate()
    gathering = Gathering(gate.sign_each)

    async def main() -> None:
        first = asyncio.ensure_future(gathering.sign("alice", call(1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first pass's requests are handed over
        second = await gathering.sign("alice", call(2))
        assert isinstance(second, Signed) and isinstance(await first, Signed)

    asyncio.run(main())
    assert gate.handed == [[("alice", call(1))], [("alice", call(2))]]


def test_a_failed_gate_call_is_every_requests_outcome() -> None:
    failure = DependencyUnavailable("the audit log could not be written")
    gathering = Gathering(RecordingGate(fail=failure).sign_each)

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(gathering.sign("alice", call(n)) for n in range(3)))

    assert asyncio.run(main()) == [failure, failure, failure]


def test_a_cancelled_request_leaves_the_others_their_answers() -> None:
    gate = RecordingGate(pause=True)
    gathering = Gathering(gate.sign_each)

    async def main() -> tuple[bool, Outcome]:
        leaving = asyncio.ensure_future(gathering.sign("alice", call(1)))
        staying = asyncio.ensure_future(gathering.sign("alice", call(2)))
        await asyncio.sleep(0.001)  # both handed over; the gate is at work
        leaving.cancel()
        outcome = await staying
        return leaving.cancelled(), outcome

    cancelled, outcome = asyncio.run(main())
    assert cancelled
    assert isinstance(outcome, Signed) and outcome.result == call(2).payload
    assert len(gate.handed) == 1


def test_a_cancelled_gate_call_cancels_its_requests() -> None:
    gathering = Gathering(RecordingGate(fail=asyncio.CancelledError()).sign_each)

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await gathering.sign("alice", call(1))

    asyncio.run(main())


def test_at_most_max_gathered_requests_go_in_one_call() -> None:
    gate = RecordingGate()
    gathering = Gathering(gate.sign_each)
    count = MAX_GATHERED + 44

    async def main() -> list[Outcome]:
        return await asyncio.gather(*(gathering.sign("alice", call(n)) for n in range(count)))

    outcomes = asyncio.run(main())
    assert [len(handed) for handed in gate.handed] == [MAX_GATHERED, 44]
    assert [o.result for o in outcomes if isinstance(o, Signed)] == [
        call(n).payload for n in range(count)
    ]


def test_each_event_loop_gathers_its_own() -> None:
    """A service outlives an event loop in tests (and a restarted server): nothing of one
    loop's pass is left for the next."""
    gate = RecordingGate()
    gathering = Gathering(gate.sign_each)
    for number in (1, 2):
        outcome = asyncio.run(gathering.sign("alice", call(number)))
        assert isinstance(outcome, Signed)
    assert gate.handed == [[("alice", call(1))], [("alice", call(2))]]


ASKED_BY: contextvars.ContextVar[str] = contextvars.ContextVar("asked_by", default="no one")


def test_the_gate_call_runs_in_no_requests_context() -> None:
    """What one request set in its context (deferred audit appends, say) does not reach a
    call made for several."""
    seen: list[str] = []

    async def sign_each(requests: Requests) -> list[Sequence[Outcome] | Exception]:
        seen.append(ASKED_BY.get())
        return [[_signed(calls[0])] for _, calls in requests]

    gathering = Gathering(sign_each)

    async def ask(who: str, number: int) -> Outcome:
        ASKED_BY.set(who)
        return await gathering.sign(who, call(number))

    async def main() -> list[Outcome]:
        return await asyncio.gather(ask("alice", 1), ask("bob", 2))

    assert all(isinstance(outcome, Signed) for outcome in asyncio.run(main()))
    assert seen == ["no one"]


def test_a_request_cancelled_before_the_hand_over_is_not_signed() -> None:
    gate = RecordingGate()
    gathering = Gathering(gate.sign_each)

    async def main() -> Outcome:
        leaving = asyncio.ensure_future(gathering.sign("alice", call(1)))
        staying = asyncio.ensure_future(gathering.sign("alice", call(2)))
        await asyncio.sleep(0)  # both wait in this pass's gathering
        leaving.cancel()
        return await staying

    assert isinstance(asyncio.run(main()), Signed)
    assert gate.handed == [[("alice", call(2))]]


def test_a_gate_that_answers_too_few_fails_every_request_rather_than_leave_one_waiting() -> None:
    async def sign_each(requests: Requests) -> list[Sequence[Outcome] | Exception]:
        return [[_signed(calls[0])] for _, calls in requests][:-1]

    gathering = Gathering(sign_each)

    async def main() -> list[Outcome]:
        asked = (gathering.sign("alice", call(n)) for n in range(3))
        return await asyncio.wait_for(asyncio.gather(*asked), timeout=5)

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, IntegrityError) for outcome in outcomes)
    assert "answered 2 of 3" in str(outcomes[0])
