"""Golden metrics of the mesh, merged from the sidecars' stats reports, and ``GET /v1/stats``.

Every sidecar publishes a :class:`~agentmesh.models.StatsReport` every couple of seconds on
``agentmesh.stats.<bucket>`` (see ``agentmesh.telemetry.stats``). The control plane feeds them to
one :class:`StatsBook`, which adds them into one-second slots by arrival time (the control
plane's clock, so skewed sidecar clocks do not matter) and keeps five minutes of slots. Memory is
bounded by the number of distinct keys, not by the number of sidecars or calls, and the keys are
capped: a reporter names its own capabilities and peers, so a flood of made-up names stops at
the cap instead of growing the book (what is already counted stays, logged once a minute).

Python API (used by ``/v1/stats``, ``agentmesh stat``/``top`` and the dashboard)::

    book = StatsBook()                    # horizon=300.0 s, slot=1.0 s
    book.apply(msg.data)                  # one StatsReport as JSON bytes; bad data is ignored
    book.add(report)                      # the same, already parsed
    book.rows("agents", window=60)        # -> list[StatRow], sorted by name
    book.rows("capabilities", window=10)
    book.rows("edges", window=300)
    book.reporters(window=60)             # -> sorted names of the sidecars that reported

Groups (each row: requests, failures, rps, success_rate, p50/p95/p99 in ms):

- ``agents``: what each agent *served* (inbound reports of its instances, summed). A call
  succeeds unless its HTTP status is 5xx: a caller's bad input (4xx) is not the agent's failure.
- ``capabilities``: what callers *asked for* (outbound reports), including calls that never
  reached an agent (no live instance: ``callee`` is ``-``). A call succeeds if it returned.
- ``edges``: outbound calls per caller agent → callee agent (``name`` is ``"caller -> callee"``,
  ``caller`` and ``callee`` are set). A call succeeds if it returned.

``window`` is clamped to [1, horizon] seconds; ``StatRow.window`` is the time the numbers
actually cover (shorter while the control plane has been up for less than the window), and
``rps = requests / window``. Latency percentiles come from merged log-spaced histograms and are
within one bucket (a factor 2^(1/4) ≈ 1.19) of the exact value. Reads are cheap (milliseconds
for thousands of keys) and never touch NATS, so a dashboard may poll every second.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import ValidationError

from agentmesh.models import StatGroup, StatRow, StatsReport
from agentmesh.telemetry.stats import BUCKETS, LATENCY_SCHEME, percentile

__all__ = ["HORIZON", "StatsBook", "stats_router"]

_log = logging.getLogger(__name__)

#: The longest window, in seconds: how much history a book keeps by default.
HORIZON = 300.0

_Key = tuple[str, str, str, str, str]  # direction, agent, capability, peer, status

#: Distinct keys kept across all slots: a real fleet's live (direction, agent, capability,
#: peer, status) combinations stay in the thousands; each key costs well under 1 KiB, so the
#: cap keeps the book under ~50 MB whatever reporters send.
_MAX_KEYS = 50_000
#: Seconds between two log lines about dropped keys.
_DROP_LOG_EVERY = 60.0


class _Sum:
    __slots__ = ("count", "hist", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.hist: dict[int, int] = {}


class _Row:
    __slots__ = ("callee", "caller", "count", "failures", "hist")

    def __init__(self, caller: str | None, callee: str | None) -> None:
        self.caller = caller
        self.callee = callee
        self.count = 0
        self.failures = 0
        self.hist = [0] * BUCKETS


class StatsBook:
    """Sliding windows over the sidecars' stats reports (see the module docstring)."""

    def __init__(
        self,
        *,
        horizon: float = HORIZON,
        slot: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = _MAX_KEYS,
    ) -> None:
        self.horizon = horizon
        self.max_keys = max_keys
        self.slot = slot
        self._clock = clock
        self._since = clock()
        self._slots: deque[tuple[int, dict[_Key, _Sum]]] = deque()
        self._reporters: dict[str, float] = {}
        self._keys = 0
        self._dropped = 0
        self._drop_logged = -math.inf

    def apply(self, data: bytes) -> None:
        """Add one report, as published on NATS; malformed or foreign reports are ignored."""
        try:
            report = StatsReport.model_validate_json(data)
        except ValidationError:
            return
        self.add(report)

    def add(self, report: StatsReport) -> None:
        if report.scheme != LATENCY_SCHEME:
            return
        now = self._clock()
        self._reporters[report.reporter] = now
        index = math.floor(now / self.slot)
        if not self._slots or self._slots[-1][0] != index:
            self._slots.append((index, {}))
            self._prune(now)
        table = self._slots[-1][1]
        for e in report.entries:
            key = (e.direction, e.agent, e.capability, e.peer, e.status)
            acc = table.get(key)
            if acc is None:
                if self._keys >= self.max_keys:
                    self._drop(report.reporter, now)
                    continue
                acc = table[key] = _Sum()
                self._keys += 1
            acc.count += e.count
            acc.total += e.total
            for i, n in e.buckets:
                if 0 <= i < BUCKETS and n > 0:
                    acc.hist[i] = acc.hist.get(i, 0) + n

    def _prune(self, now: float) -> None:
        oldest = math.floor((now - self.horizon) / self.slot)
        while self._slots and self._slots[0][0] < oldest:
            self._keys -= len(self._slots.popleft()[1])
        for name, at in list(self._reporters.items()):
            if at < now - self.horizon:
                del self._reporters[name]

    def _drop(self, reporter: str, now: float) -> None:
        self._dropped += 1
        if now - self._drop_logged >= _DROP_LOG_EVERY:
            _log.warning(
                "stats: %d entries dropped (last from %s): the book holds its limit of %d keys",
                self._dropped,
                reporter,
                self.max_keys,
            )
            self._drop_logged, self._dropped = now, 0

    def reporters(self, window: float = 60.0) -> list[str]:
        """The sidecars whose reports arrived within the last ``window`` seconds."""
        since = self._clock() - window
        return sorted(name for name, at in self._reporters.items() if at >= since)

    def rows(self, group: StatGroup, window: float = 60.0) -> list[StatRow]:
        """Golden metrics per agent, capability or edge over the last ``window`` seconds."""
        window = min(max(window, 1.0), self.horizon)
        now = self._clock()
        first = math.floor((now - window) / self.slot) + 1
        rows: dict[str, _Row] = {}
        for index, table in self._slots:
            if index < first:
                continue
            for (direction, agent, capability, peer, status), acc in table.items():
                caller: str | None = None
                callee: str | None = None
                if group == "agents":
                    if direction != "inbound":
                        continue
                    name = agent
                    failed = status[:1] == "5"
                else:
                    if direction != "outbound":
                        continue
                    failed = status != "ok"
                    if group == "capabilities":
                        name = capability
                    else:
                        name, caller, callee = f"{agent} -> {peer}", agent, peer
                row = rows.get(name)
                if row is None:
                    row = rows[name] = _Row(caller, callee)
                row.count += acc.count
                if failed:
                    row.failures += acc.count
                for i, n in acc.hist.items():
                    row.hist[i] += n
        covered = max(min(window, now - self._since), self.slot)
        return [_stat_row(group, name, rows[name], covered) for name in sorted(rows)]


def _stat_row(group: StatGroup, name: str, row: _Row, covered: float) -> StatRow:
    def ms(q: float) -> float | None:
        value = percentile(row.hist, q)
        return None if value is None else round(value * 1000, 3)

    return StatRow(
        group=group,
        name=name,
        caller=row.caller,
        callee=row.callee,
        window=round(covered, 3),
        requests=row.count,
        failures=row.failures,
        rps=round(row.count / covered, 3),
        success_rate=(row.count - row.failures) / row.count if row.count else None,
        p50_ms=ms(0.50),
        p95_ms=ms(0.95),
        p99_ms=ms(0.99),
    )


def stats_router(book: StatsBook) -> APIRouter:
    """``GET /v1/stats``: golden metrics from the sidecars' reports."""
    router = APIRouter(tags=["telemetry"])

    @router.get("/v1/stats")
    async def get_stats(
        group: Annotated[
            StatGroup,
            Query(description="agents (served), capabilities (asked for) or edges caller->callee"),
        ] = "agents",
        window: Annotated[
            float, Query(ge=1, le=HORIZON, description="Seconds to look back (1-300)")
        ] = 60.0,
    ) -> list[StatRow]:
        """Requests, rate, success rate and latency percentiles over a sliding window."""
        return book.rows(group, window)

    return router
