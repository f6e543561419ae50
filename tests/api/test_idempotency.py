"""Answers remembered for copies of a request (:mod:`signd.api.idempotency`), on a fake clock.
The adapter's use of them, against a real broker, is in ``test_mqtt.py`` and
``test_auth_mqtt.py``."""

from __future__ import annotations

import anyio
import pytest

from signd.api.errors import DuplicateRequest
from signd.api.idempotency import Answer, RecentAnswers, is_final_refusal
from signd.errors import DependencyUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Performer:
    """Counts its calls; answers ``{"result": n}`` for the n-th, final unless told."""

    def __init__(self, *, final: bool = True) -> None:
        self.calls = 0
        self.final = final

    async def __call__(self) -> tuple[Answer, bool]:
        self.calls += 1
        return {"result": self.calls}, self.final


def ask(
    answers: RecentAnswers, perform: Performer, key: str = "k", fingerprint: str = "f"
) -> tuple[Answer, bool]:
    async def main() -> tuple[Answer, bool]:
        return await answers.answer_once(key, fingerprint, perform)

    return anyio.run(main)


def test_a_copy_gets_the_first_answer_without_being_performed() -> None:
    answers, perform = RecentAnswers(60, 10, clock=Clock()), Performer()

    assert ask(answers, perform) == ({"result": 1}, False)
    assert ask(answers, perform) == ({"result": 1}, True)
    assert ask(answers, perform, key="other") == ({"result": 2}, False)
    assert perform.calls == 2


def test_the_same_id_with_another_fingerprint_is_refused_and_the_first_kept() -> None:
    answers, perform = RecentAnswers(60, 10, clock=Clock()), Performer()
    ask(answers, perform)

    with pytest.raises(DuplicateRequest) as raised:
        ask(answers, perform, fingerprint="another payload")
    assert raised.value.to_dict() == {
        "code": "duplicate_request",
        "message": "this id was used by another request (another payload or reply target) "
        "in the last 60 s; give a new request a new id",
        "field": "id",
    }
    assert raised.value.http_status == 409
    assert ask(answers, perform) == ({"result": 1}, True)
    assert perform.calls == 1


def test_answers_that_are_not_final_are_not_remembered() -> None:
    answers, perform = RecentAnswers(60, 10, clock=Clock()), Performer(final=False)

    assert ask(answers, perform) == ({"result": 1}, False)
    assert ask(answers, perform, fingerprint="another") == ({"result": 2}, False)
    assert len(answers) == 0


@pytest.mark.parametrize(
    ("status", "final"),
    [
        *[(400, True), (403, True), (404, True), (409, True)],
        *[(401, False), (429, False), (500, False), (502, False), (503, False), (507, False)],
    ],
)
def test_final_refusals_are_4xx_but_credentials_and_rate_limits(status: int, final: bool) -> None:
    assert is_final_refusal(status) is final


def test_answers_are_forgotten_after_the_window() -> None:
    clock = Clock()
    answers, perform = RecentAnswers(60, 10, clock=clock), Performer()
    ask(answers, perform, key="old")
    clock.now += 30
    ask(answers, perform, key="new")

    clock.now += 29.9
    assert ask(answers, perform, key="old") == ({"result": 1}, True)
    clock.now += 0.1
    assert ask(answers, perform, key="old") == ({"result": 3}, False)  # performed anew
    assert ask(answers, perform, key="new") == ({"result": 2}, True)
    assert perform.calls == 3


def test_at_most_so_many_answers_the_oldest_forgotten_first() -> None:
    answers, perform = RecentAnswers(60, 2, clock=Clock()), Performer()
    for key in ("a", "b", "c"):
        ask(answers, perform, key=key)

    assert len(answers) == 2
    assert ask(answers, perform, key="c") == ({"result": 3}, True)
    assert ask(answers, perform, key="a") == ({"result": 4}, False)


def test_at_most_so_many_bytes_of_answers() -> None:
    size = len('{"result":1}')
    answers = RecentAnswers(60, 10, max_bytes=2 * size, clock=Clock())
    perform = Performer()
    for key in ("a", "b", "c"):
        ask(answers, perform, key=key)

    assert len(answers) == 2
    assert ask(answers, perform, key="a") == ({"result": 4}, False)


@pytest.mark.parametrize(("window", "most"), [(0, 10), (60, 0)])
def test_zero_remembers_nothing(window: float, most: int) -> None:
    answers, perform = RecentAnswers(window, most, clock=Clock()), Performer()
    ask(answers, perform)
    assert ask(answers, perform) == ({"result": 2}, False)


def test_a_copy_of_a_request_in_flight_waits_for_its_answer() -> None:
    answers = RecentAnswers(60, 10, clock=Clock())
    calls = 0

    async def slow() -> tuple[Answer, bool]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"result": "signed"}, True

    async def main() -> list[tuple[Answer, bool]]:
        got: list[tuple[Answer, bool]] = []

        async def one(fingerprint: str) -> None:
            try:
                got.append(await answers.answer_once("k", fingerprint, slow))
            except DuplicateRequest as exc:
                got.append(({"error": exc.code}, True))

        async with anyio.create_task_group() as group:
            group.start_soon(one, "f")
            await anyio.wait_all_tasks_blocked()
            group.start_soon(one, "f")
            group.start_soon(one, "another")
            await anyio.wait_all_tasks_blocked()
            release.set()
        return got

    release = anyio.Event()
    got = anyio.run(main)
    assert got == [
        ({"error": "duplicate_request"}, True),
        ({"result": "signed"}, False),
        ({"result": "signed"}, True),
    ]
    assert calls == 1


def test_a_copy_whose_first_was_abandoned_is_told_to_ask_again() -> None:
    answers = RecentAnswers(60, 10, clock=Clock())
    caught: list[BaseException] = []

    async def never() -> tuple[Answer, bool]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def first(abandon: anyio.CancelScope) -> None:
        with abandon:
            await answers.answer_once("k", "f", never)

    async def copy() -> None:
        try:
            await answers.answer_once("k", "f", never)
        except DependencyUnavailable as exc:
            caught.append(exc)

    async def main() -> None:
        abandon = anyio.CancelScope()
        async with anyio.create_task_group() as group:
            group.start_soon(first, abandon)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(copy)
            await anyio.wait_all_tasks_blocked()
            abandon.cancel()

    anyio.run(main)
    assert [str(exc) for exc in caught] == ["the first copy of this request was not answered"]
    assert ask(answers, Performer()) == ({"result": 1}, False)  # performed anew
