"""Stopping background tasks within a bound, even when a cancellation is lost."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from agentmesh._tasks import stop_task


async def test_a_loop_whose_cancellation_wait_for_drops_is_stopped():
    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[int]] = []

    async def renewing() -> None:
        while True:
            reply = loop.create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, 10)  # as nats-py awaits the reply of a request

    task = asyncio.create_task(renewing())
    await asyncio.sleep(0)
    # The reply lands in the loop turn of the cancellation: Python 3.11's wait_for then returns
    # it and the cancellation is lost (python/cpython#86296); the loop goes on to the next one.
    loop.call_soon(replies[-1].set_result, 1)
    assert await stop_task(task, "renewing")
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert len(replies) == 2, "the first cancellation was lost; the second one ended it"


async def test_a_task_that_does_not_stop_is_left_behind_with_a_warning(
    caplog: pytest.LogCaptureFixture,
):
    stubborn = asyncio.Event()
    stubborn.set()

    async def ignores_cancellation() -> None:
        while stubborn.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)

    task = asyncio.create_task(ignores_cancellation())
    await asyncio.sleep(0)
    assert not await stop_task(task, "the stubborn loop", timeout=0.2)
    assert "the stubborn loop did not stop within 0.2s of cancelling; left behind" in caplog.text
    stubborn.clear()
    assert await stop_task(task, "the stubborn loop")


async def test_an_error_the_task_ended_with_is_logged_not_raised(caplog: pytest.LogCaptureFixture):
    async def fails() -> None:
        raise RuntimeError("broken pipe")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await stop_task(task, "the failing loop")
    assert "the failing loop ended with an error: RuntimeError('broken pipe')" in caplog.text
    assert await stop_task(None, "nothing")
