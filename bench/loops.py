"""The two loops that drive a target's ``call``: closed (N in flight, back to back) and open
(a call at every slot of a fixed schedule, timed by a timerfd)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from .processes import libc

__all__ = ["RawRun", "closed_loop", "open_loop"]


@dataclass
class RawRun:
    """What one run of a loop measured, before any reduction."""

    latencies_ns: list[int]
    errors: int
    elapsed_s: float
    lags_ns: list[int] = field(default_factory=list)
    first_error: str | None = None


async def closed_loop(
    call: Callable[[bytes], Awaitable[bytes]],
    payload: bytes,
    concurrency: int,
    duration_s: float | None,
    count: int | None,
    drain_s: float,
) -> RawRun:
    """``concurrency`` workers call back to back until the time or the count is used up."""
    perf = time.perf_counter_ns
    latencies: list[int] = []
    errors = 0
    first_error: str | None = None
    remaining = count if count is not None else -1
    budget_s = duration_s if duration_s is not None else 120.0
    start = perf()
    deadline = start + int(budget_s * 1e9)

    async def worker() -> None:
        nonlocal errors, first_error, remaining
        while perf() < deadline:
            if remaining == 0:
                return
            remaining -= 1
            t0 = perf()
            try:
                await call(payload)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.001)  # a dead server must not turn this into a hot spin
                continue
            latencies.append(perf() - t0)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=budget_s + drain_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if pending:  # each stuck worker had one call in flight: count it as failed
        errors += len(pending)
        first_error = first_error or f"{len(pending)} calls still in flight after drain"
    return RawRun(latencies, errors, (perf() - start) / 1e9, first_error=first_error)


class _itimerspec(ctypes.Structure):
    """``struct itimerspec`` of two ``struct timespec`` (seconds, nanoseconds)."""

    _fields_ = [
        ("interval_s", ctypes.c_long),
        ("interval_ns", ctypes.c_long),
        ("value_s", ctypes.c_long),
        ("value_ns", ctypes.c_long),
    ]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1


def _start_ticker(
    loop: asyncio.AbstractEventLoop,
    first_ns: int,
    interval_ns: int,
    fire: Callable[[int], None],
) -> Callable[[], None]:
    """Call ``fire(k)`` on the loop whenever ``k`` more slots have come due; returns a stopper.

    Slots are ``first_ns + i * interval_ns`` on CLOCK_MONOTONIC (``time.perf_counter_ns``
    on Linux). asyncio's own timers cannot be used: epoll timeouts are whole milliseconds
    and asyncio rounds them up, which would add up to 1 ms of harness lateness to every
    call. On Linux a periodic timerfd in the event loop wakes it at the exact time with a
    single wake-up; elsewhere a thread sleeps with ``time.sleep`` and hands slots over
    with ``call_soon_threadsafe`` (two wake-ups, so more send lag).
    """
    lib = libc()
    if lib is not None and hasattr(lib, "timerfd_create"):
        fd = lib.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd >= 0:
            spec = _itimerspec(0, interval_ns, first_ns // 10**9, first_ns % 10**9)
            if lib.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) == 0:

                def on_tick() -> None:
                    try:
                        expirations = int.from_bytes(os.read(fd, 8), "little")
                    except BlockingIOError:
                        return
                    fire(expirations)

                loop.add_reader(fd, on_tick)

                def stop_timerfd() -> None:
                    loop.remove_reader(fd)
                    os.close(fd)

                return stop_timerfd
            os.close(fd)

    stop = threading.Event()

    def sleeper() -> None:
        i = 0
        while not stop.is_set():
            delay = first_ns + i * interval_ns - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            try:
                loop.call_soon_threadsafe(fire, 1)
            except RuntimeError:  # the loop closed under us (interrupted run)
                return
            i += 1

    thread = threading.Thread(target=sleeper, name="bench-open-loop", daemon=True)
    thread.start()

    def stop_thread() -> None:
        stop.set()
        thread.join(timeout=1.0)

    return stop_thread


async def open_loop(
    call: Callable[[bytes], Awaitable[object]],
    payload: bytes,
    rate: float,
    duration_s: float,
    drain_s: float,
    on_done: Callable[[int, int, object], None] | None = None,
) -> RawRun:
    """Start a call at every slot of a fixed schedule; latency counts from the slot.

    A slow reply never delays the next send (no coordinated omission). The call's actual
    start minus its slot is the send lag: how late the client really was, which the
    latency includes and the "missed" count reports. ``on_done(slot_ns, end_ns, outcome)``,
    if given, sees every call as it ends (``outcome`` is the call's result or the exception
    it raised; times are ``time.perf_counter_ns``), for benchmarks that need per-call
    records, such as ``bench/failover.py``.
    """
    loop = asyncio.get_running_loop()
    perf = time.perf_counter_ns
    n = max(1, round(rate * duration_s))
    interval_ns = max(1, round(1e9 / rate))
    latencies: list[int] = []
    lags: list[int] = []
    errors = 0
    first_error: str | None = None
    inflight: set[asyncio.Task[None]] = set()
    schedule_done = asyncio.Event()
    first_slot = perf() + 10_000_000
    fired = 0

    async def one(slot: int) -> None:
        nonlocal errors, first_error
        lags.append(perf() - slot)
        try:
            result = await call(payload)
        except Exception as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            if on_done is not None:
                on_done(slot, perf(), exc)
            return
        end = perf()
        latencies.append(end - slot)
        if on_done is not None:
            on_done(slot, end, result)

    def fire(due: int) -> None:
        nonlocal fired
        for _ in range(due):
            if fired >= n:
                break
            task = loop.create_task(one(first_slot + fired * interval_ns))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            fired += 1
        if fired >= n:
            schedule_done.set()

    stop_ticker = _start_ticker(loop, first_slot, interval_ns, fire)
    try:
        try:
            await asyncio.wait_for(schedule_done.wait(), timeout=duration_s + drain_s)
        finally:
            stop_ticker()
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=drain_s)
            if pending:
                errors += len(pending)
                first_error = first_error or f"{len(pending)} calls still in flight after drain"
    finally:
        for task in list(inflight):
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
    return RawRun(latencies, errors, (perf() - first_slot) / 1e9, lags, first_error)
