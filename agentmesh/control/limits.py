"""Bounded inputs at the control plane: body size, 422 answers, failed authentications.

- :class:`BodyLimit` (ASGI middleware): a request body larger than
  ``AGENTMESH_MAX_CONTROL_BODY_BYTES`` gets 413 — at once when ``Content-Length`` says so, else as
  soon as the bytes read pass the limit — so at most that much is ever buffered.
- :func:`validation_problem`: a 422 lists the first ``AGENTMESH_MAX_ERROR_ITEMS`` errors (where
  and why, never the input: a request body is never echoed) and counts the rest; a body that is
  not UTF-8 is a 422 like any other unreadable JSON.
- :class:`FailureLimiter`: failed admin authentications are logged and counted per source
  address; past ``AGENTMESH_AUTH_FAILURES_PER_MINUTE`` the source gets 429 for the rest of the
  minute, whatever it sends.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentmesh.errors import InvalidInput, PayloadTooLarge, RateLimited
from agentmesh.models import Problem

__all__ = [
    "BodyLimit",
    "FailureLimiter",
    "body_problem",
    "bounded_errors",
    "truncated",
    "validation_problem",
]

_log = logging.getLogger("agentmesh.control")
#: Sources whose failures are remembered at most; the quietest are forgotten first.
_MAX_SOURCES = 10_000
_WINDOW = 60.0


def bounded_errors(errors: Sequence[Any], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` of FastAPI's errors as ``{loc, msg, type}`` (no input, no context),
    and one more entry counting the rest, if any."""
    out = [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", ""))[:500],
            "type": str(error.get("type", "")),
        }
        for error in errors[:limit]
    ]
    return truncated(out, limit, total=len(errors))


def truncated(
    errors: list[dict[str, Any]], limit: int, *, total: int | None = None
) -> list[dict[str, Any]]:
    """``errors`` cut to ``limit`` items, plus one counting the rest (of ``total``, if more
    were made than listed): every error list an answer carries goes through here."""
    total = len(errors) if total is None else total
    if total <= limit:
        return errors
    rest = {
        "loc": [],
        "msg": f"{total - limit} more error(s) not listed",
        "type": "too_many_errors",
    }
    return [*errors[:limit], rest]


def validation_problem(errors: Sequence[Any], limit: int, instance: str) -> Problem:
    """The 422 document for a request FastAPI could not validate."""
    listed = bounded_errors(errors, limit)
    first = "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in listed[:3])
    error = InvalidInput(f"invalid request: {len(errors)} error(s): {first}"[:1000], errors=listed)
    return error.to_problem(instance=instance)


def body_problem(exc: BaseException, instance: str) -> Problem | None:
    """The answer to a body FastAPI could not read (it reports every such failure as a 400
    "error parsing the body"), by its cause: too large (413), not UTF-8 (422); else None."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, _TooLarge):
        return cause.to_problem(instance=instance)
    if not isinstance(cause, UnicodeDecodeError):
        return None
    error = InvalidInput(
        f"the request body is not valid UTF-8 (byte {cause.start}); JSON must be UTF-8",
        errors=[{"loc": ["body"], "msg": "invalid UTF-8", "type": "json_invalid"}],
    )
    return error.to_problem(instance=instance)


class _TooLarge(PayloadTooLarge):
    """Raised from ``receive`` once a body passes the limit, to whatever reads it: a route's
    MeshError handler answers it, FastAPI's body parsing turns it into a 400 whose cause it is
    (see :func:`body_problem`), and the middleware answers it if nothing else did."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            f"request body larger than {max_bytes} bytes (AGENTMESH_MAX_CONTROL_BODY_BYTES); "
            "nothing was read past the limit"
        )


class BodyLimit:
    """ASGI middleware: 413 for a request body past ``max_bytes``, before buffering it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._refuse(send, scope)
                    return
                break
        seen = 0
        started = False

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, scope)

    async def _refuse(self, send: Send, scope: Scope) -> None:
        error = _TooLarge(self.max_bytes)
        body = error.to_problem(instance=scope.get("path")).model_dump_json(exclude_none=True)
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),  # the rest of the body is never read
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class FailureLimiter:
    """Failed authentications per source address in a sliding minute (see the module docstring)."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str, now: float) -> deque[float] | None:
        times = self._failures.get(source)
        if times is None:
            return None
        while times and times[0] <= now - _WINDOW:
            times.popleft()
        if not times:
            del self._failures[source]
            return None
        return times

    def check(self, source: str) -> None:
        """RateLimited if ``source`` failed too often in the last minute."""
        now = self._clock()
        times = self._recent(source, now)
        if times is not None and len(times) >= self.per_minute:
            retry = max(times[0] + _WINDOW - now, 1.0)
            raise RateLimited(
                f"too many failed authentications from {source} "
                f"(AGENTMESH_AUTH_FAILURES_PER_MINUTE={self.per_minute}); retry in {retry:.0f}s",
                retry_after=retry,
            )

    def failed(self, source: str, reason: str) -> None:
        """Record (and log) one failure of ``source``."""
        now = self._clock()
        _log.warning("failed admin authentication from %s: %s", source, reason)
        times = self._recent(source, now)
        if times is None:
            if len(self._failures) >= _MAX_SOURCES:
                quiet = min(self._failures, key=lambda s: self._failures[s][-1])
                del self._failures[quiet]
            times = self._failures[source] = deque(maxlen=self.per_minute)
        times.append(now)
