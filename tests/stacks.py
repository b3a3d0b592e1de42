"""Every thread's stack and every asyncio task's await chain, for the report of a test that hung.

pytest-timeout prints only thread stacks; in an async test the main thread just sits in the
event loop's ``select``, so the wait that never ends is visible only in the tasks' chains.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from types import FrameType
from typing import Any


def all_stacks() -> str:
    """The other threads, then the running loop's tasks, each from its coroutine to the
    innermost await (``Task.print_stack`` shows only the outermost frame of a suspended one).

    The calling thread is left out: the test's own failure traceback shows where it was.
    """
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        parts.append(f"--- thread {names.get(ident, ident)}\n")
        parts.extend(traceback.format_stack(frame))
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        tasks = set()
    for task in sorted(tasks, key=lambda task: task.get_name()):
        parts.append(f"--- {task!r}\n")
        parts.extend(_await_chain(task.get_coro()))
    return "".join(parts)


def _await_chain(awaitable: Any) -> list[str]:
    lines = []
    while awaitable is not None:
        frame: FrameType | None = (
            getattr(awaitable, "cr_frame", None)
            or getattr(awaitable, "gi_frame", None)
            or getattr(awaitable, "ag_frame", None)
        )
        if frame is None:  # a future: the task's repr names it (``wait_for=``)
            break
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "ag_await", None)
        )
    return lines
