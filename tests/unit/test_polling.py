"""poll_until: the one wait-with-a-deadline every driver and the demo use."""

from __future__ import annotations

import pytest

from changeover.polling import poll_until


async def test_it_returns_true_once_the_attempt_succeeds() -> None:
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    assert await poll_until(third_time, timeout=10, interval=0.001)
    assert calls == 3  # and stops asking then


async def test_it_returns_false_when_the_deadline_passes_having_tried_at_least_once() -> None:
    calls = 0

    async def never() -> bool:
        nonlocal calls
        calls += 1
        return False

    assert not await poll_until(never, timeout=0, interval=0.001)
    assert calls == 1


async def test_not_yet_errors_count_as_false_and_others_propagate() -> None:
    answers: list[object] = [ConnectionError("socket absent"), ConnectionError("again"), True]

    async def flaky() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    assert await poll_until(flaky, timeout=10, interval=0.001, not_yet=(ConnectionError,))

    async def broken() -> bool:
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):
        await poll_until(broken, timeout=10, interval=0.001, not_yet=(ConnectionError,))
