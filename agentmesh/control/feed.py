"""What the control plane hears from the sidecars on NATS, each message taken only as its
publisher's own: stats reports (``agentmesh.control.stats``) and breaker events
(``agentmesh.control.health``).

NATS lets a workload publish only on its own subjects, ``agentmesh.stats.<bucket>.<who>`` and
``agentmesh.breaker.<bucket>.<who>`` (``agentmesh.security.nats_auth``), where ``who`` is its agent
name, or ``client``/``control``. The payload names someone too, and an agent's own credentials
could put another agent there: its numbers would be counted as that agent's, its breaker events
would say that agent's sidecars eject an instance. So :func:`speaks_for` is the one rule:

- the reporter of a report, the observer of an event, is an instance of ``who``: ``<who>-<8 hex>``
  for an agent (how :class:`~agentmesh.agent.Agent` names its instances, so agent ``a`` cannot
  pass for an instance of agent ``a-b``), ``client-…`` and ``control-…`` for the others;
- every entry of a report is about ``who`` (``agent``: the caller of an outbound call, the
  server of an inbound one).

Anything else is dropped and logged: at most one line per publisher per ``_LOG_EVERY`` seconds,
with the number dropped since, so a flood of forgeries costs no log space.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import ValidationError

from agentmesh.control.health import HealthBook
from agentmesh.control.stats import StatsBook
from agentmesh.models import BreakerEvent, StatsReport
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.identity import ROLES
from agentmesh.sidecar.sidecar import breaker_subject
from agentmesh.telemetry.stats import stats_subject

__all__ = ["TelemetryFeed", "speaks_for"]

_log = logging.getLogger("agentmesh.control")

#: Seconds between two log lines about one publisher's dropped messages.
_LOG_EVERY = 60.0
#: Publishers remembered for the log's rate (forgotten all at once past this: memory is bounded).
_PUBLISHERS = 1024
#: The suffix Agent gives its instance ids.
_AGENT_INSTANCE = re.compile(r"-[0-9a-f]{8}")
_M = TypeVar("_M", StatsReport, BreakerEvent)


def speaks_for(who: str, instance: str) -> bool:
    """Whether ``instance`` (a reporter or observer) may be named by publisher ``who``."""
    if not instance.startswith(f"{who}-"):
        return False
    # A client's or control plane's instance: any name under the prefix (all share the token).
    return who in ROLES or _AGENT_INSTANCE.fullmatch(instance, len(who)) is not None


def _forgery(who: str, message: StatsReport | BreakerEvent) -> str | None:
    """What in ``message`` is not ``who``'s own, or None."""
    if isinstance(message, BreakerEvent):
        return None if speaks_for(who, message.observer) else f"observer {message.observer!r}"
    if not speaks_for(who, message.reporter):
        return f"reporter {message.reporter!r}"
    others = sorted({e.agent for e in message.entries if e.agent != who})
    return f"entries about {others}" if others else None


class TelemetryFeed:
    """Subscribes to the mesh's stats and breaker subjects; feeds the books what passes."""

    def __init__(
        self, health: HealthBook, stats: StatsBook, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.health = health
        self.stats = stats
        self._clock = clock
        #: publisher → (when we last logged about it, messages dropped since).
        self._dropped: dict[str, tuple[float, int]] = {}

    async def subscribe(self, conn: NatsConnection, bucket: str) -> None:
        await conn.subscribe(breaker_subject(bucket), cb=self._on_breaker_event)
        await conn.subscribe(stats_subject(bucket), cb=self._on_stats_report)

    async def _on_breaker_event(self, msg: Msg) -> None:
        event = self._taken(msg, BreakerEvent)
        if event is not None:
            self.health.add(event)

    async def _on_stats_report(self, msg: Msg) -> None:
        report = self._taken(msg, StatsReport)
        if report is not None:
            self.stats.add(report)

    def _taken(self, msg: Msg, model: type[_M]) -> _M | None:
        """The message as ``model`` if its publisher (the subject's last token) speaks for it."""
        try:
            message = model.model_validate_json(msg.data)
        except ValidationError:
            return None
        who = msg.subject.rsplit(".", 1)[-1]
        forged = _forgery(who, message)
        if forged is None:
            return message
        self._drop(who, f"{model.__name__} on {msg.subject} names {forged}")
        return None

    def _drop(self, who: str, what: str) -> None:
        now = self._clock()
        last = self._dropped.get(who)
        if last is not None and now - last[0] < _LOG_EVERY:
            self._dropped[who] = (last[0], last[1] + 1)
            return
        if last is None and len(self._dropped) >= _PUBLISHERS:
            self._dropped.clear()
        since = f" ({last[1]} more dropped since the last warning)" if last and last[1] else ""
        _log.warning("dropped a %s: only %r's own may be published there%s", what, who, since)
        self._dropped[who] = (now, 0)
