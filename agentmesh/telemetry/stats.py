"""Call statistics collected in every sidecar, and per-call tap events while someone taps.

Every finished call is recorded twice at most: by the caller's ``ObserveLayer`` (outbound, keyed
by caller, capability, callee agent, ok/error) and by the serving agent's ``InboundApp``
(inbound, keyed by agent, capability, HTTP status). Recording is a dict lookup, two additions and
one histogram increment (what that costs is in docs/benchmarks.md).
Every ``interval`` seconds (``AGENTMESH_STATS_INTERVAL``, default 2) the collector swaps its
tables for empty ones and publishes what it had as one :class:`~agentmesh.models.StatsReport` on
``agentmesh.stats.<bucket>``; the control plane merges reports into sliding windows
(``agentmesh.control.stats``).

Latency histograms have fixed log-spaced bounds, the same in every process, so histograms from
many sidecars and intervals merge by adding counts: ``LATENCY_BOUNDS[i] = 100 µs · 2^(i/4)``,
84 bounds from 100 µs to ~150 s, plus an overflow bucket. A percentile read from a merged
histogram lies in the same bucket as the true one: within a factor 2^(1/4) ≈ 1.19.

Tap: ``agentmesh tap CAPABILITY`` announces itself every second on
``agentmesh.tapctl.<bucket>`` (a :class:`~agentmesh.models.TapRequest` with a TTL). A sidecar
that serves the capability answers with a :class:`~agentmesh.models.TapAck` and, until the TTL
runs out, queues one small event per inbound call of it; a background task publishes them on
``agentmesh.tap.<bucket>.<capability>``. The call path only appends to a bounded deque, and only
while a tap is fresh: with nobody tapping, the cost is one empty-dict check. Request and response
bodies are included only when the tapper asks and the agent allows it
(``AGENTMESH_TAP_PAYLOADS=true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from agentmesh._tasks import STOP_WAIT, stop_task
from agentmesh.models import StatsEntry, StatsReport, TapAck, TapEvent, TapRequest
from agentmesh.registry.connection import NatsConnection

__all__ = [
    "BUCKETS",
    "LATENCY_BOUNDS",
    "LATENCY_SCHEME",
    "StatsCollector",
    "bucket_of",
    "percentile",
    "stats_subject",
    "tap_control_subject",
    "tap_subject",
]

_log = logging.getLogger("agentmesh.stats")

#: Upper bounds (seconds, inclusive) of the latency buckets; one more bucket holds the rest.
LATENCY_BOUNDS: tuple[float, ...] = tuple(1e-4 * 2 ** (i / 4) for i in range(84))
BUCKETS = len(LATENCY_BOUNDS) + 1
#: Names the bucket layout in every report; the control plane ignores reports of another one.
LATENCY_SCHEME = "log2/4:100us:84"

#: Tap events waiting to be published; beyond this, new events are dropped (never block a call).
_TAP_QUEUE = 1000
#: Request and response bodies in tap events are cut to this many characters.
_TAP_PAYLOAD_CHARS = 2048


def stats_subject(bucket: str, who: str = "*") -> str:
    """The NATS subject of ``who``'s stats reports for the mesh whose registry is ``bucket``.

    ``who`` is the reporter's agent name (or ``client``/``control``): a subject per publisher
    lets NATS permissions allow each agent its own reports only; ``*`` subscribes to all.
    """
    return f"agentmesh.stats.{bucket}.{who}"


def tap_control_subject(bucket: str) -> str:
    """Where ``agentmesh tap`` announces what it taps."""
    return f"agentmesh.tapctl.{bucket}"


def tap_subject(bucket: str, capability: str) -> str:
    """Where sidecars publish the calls of a tapped capability."""
    return f"agentmesh.tap.{bucket}.{capability}"


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: ``i`` covers ``(BOUNDS[i-1], BOUNDS[i]]``."""
    return bisect_left(LATENCY_BOUNDS, seconds)


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0 < q ≤ 1) of a latency histogram, in seconds; None if empty.

    Finds the bucket holding the nearest-rank sample and interpolates geometrically inside it
    (linearly in the first bucket, which starts at 0); the overflow bucket answers its lower
    bound. The true quantile is in the same bucket, so the error is below one bucket's width.
    """
    total = sum(hist)
    if total == 0:
        return None
    rank = max(q * total, 1.0)
    seen = 0
    for i, count in enumerate(hist):
        if count == 0:
            continue
        if seen + count >= rank:
            if i >= len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            hi = LATENCY_BOUNDS[i]
            fraction = (rank - seen) / count
            if i == 0:
                return hi * fraction
            lo = LATENCY_BOUNDS[i - 1]
            return float(lo * (hi / lo) ** fraction)
        seen += count
    return LATENCY_BOUNDS[-1]  # pragma: no cover - rank <= total always stops the loop


class _Cell:
    """Counters of one key during one interval."""

    __slots__ = ("count", "hist", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.hist = [0] * BUCKETS


_OutKey = tuple[str, str, str, bool]
_InKey = tuple[str, str, int]
#: What the call path queues for a tapped call; encoded off the call path.
_TapItem = tuple[float, str, str, str, int, float, "str | None", "bytes | None", "bytes | None"]


class StatsCollector:
    """Per-sidecar call counters and latency histograms, published every ``interval`` seconds.

    ``outbound`` and ``inbound`` are the hot-path entry points; ``start``/``close`` run the
    publishing (the owning :class:`~agentmesh.sidecar.sidecar.Sidecar` calls them).
    """

    def __init__(
        self,
        name: str,
        *,
        interval: float = 2.0,
        tap_payloads: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.interval = interval
        self.tap_payloads = tap_payloads
        #: The agent this sidecar serves, and its capabilities: the only ones it taps.
        self.agent: str | None = None
        self.serving: set[str] = set()
        self._clock = clock
        self._out: dict[_OutKey, _Cell] = {}
        self._in: dict[_InKey, _Cell] = {}
        self._since = clock()
        #: capability → [tap expiry, payloads expiry] on the monotonic clock.
        self._taps: dict[str, list[float]] = {}
        self._tap_queue: deque[_TapItem] = deque()
        self._tap_wake = asyncio.Event()
        self._conn: NatsConnection | None = None
        self._bucket = ""
        self._who = "client"
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None

    # ---------------------------------------------------------------- hot path

    def outbound(self, caller: str, capability: str, callee: str, ok: bool, elapsed: float) -> None:
        """Record one finished logical call made by this sidecar."""
        key = (caller, capability, callee, ok)
        cell = self._out.get(key)
        if cell is None:
            cell = self._out[key] = _Cell()
        cell.count += 1
        cell.total += elapsed
        cell.hist[bisect_left(LATENCY_BOUNDS, elapsed)] += 1

    def inbound(
        self,
        agent: str,
        capability: str,
        status: int,
        elapsed: float,
        caller: str = "-",
        trace_id: str | None = None,
        request: bytes | None = None,
        response: bytes | None = None,
    ) -> None:
        """Record one call served here; queue a tap event if someone taps ``capability``."""
        key = (agent, capability, status)
        cell = self._in.get(key)
        if cell is None:
            cell = self._in[key] = _Cell()
        cell.count += 1
        cell.total += elapsed
        cell.hist[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
        if self._taps and capability in self._taps:
            self._tap(agent, capability, status, elapsed, caller, trace_id, request, response)

    def inbound_recorder(self, agent: str, capabilities: Iterable[str]) -> Callable[..., None]:
        """For the inbound app of ``agent``: note what it serves (for tap) and get ``inbound``."""
        self.agent = agent
        self.serving.update(capabilities)
        return self.inbound

    def _tap(
        self,
        agent: str,
        capability: str,
        status: int,
        elapsed: float,
        caller: str,
        trace_id: str | None,
        request: bytes | None,
        response: bytes | None,
    ) -> None:
        now = time.monotonic()
        expiry, payloads_expiry = self._taps[capability]
        if now > expiry:
            del self._taps[capability]
            return
        if len(self._tap_queue) >= _TAP_QUEUE:
            return
        if now > payloads_expiry:
            request = response = None
        self._tap_queue.append(
            (time.time(), agent, capability, caller, status, elapsed, trace_id, request, response)
        )
        self._tap_wake.set()

    # ---------------------------------------------------------------- reports

    def take(self) -> StatsReport | None:
        """End the current interval: its report (None if no call finished), counters reset."""
        out, inbound = self._out, self._in
        self._out, self._in = {}, {}
        start, end = self._since, self._clock()
        self._since = end
        if not out and not inbound:
            return None
        entries = [
            StatsEntry(
                direction="outbound",
                agent=caller[:128],
                capability=capability[:256],
                peer=callee[:128],
                status="ok" if ok else "error",
                count=cell.count,
                total=cell.total,
                buckets=_sparse(cell.hist),
            )
            for (caller, capability, callee, ok), cell in out.items()
        ]
        entries.extend(
            StatsEntry(
                direction="inbound",
                agent=agent[:128],
                capability=capability[:256],
                status=str(status),
                count=cell.count,
                total=cell.total,
                buckets=_sparse(cell.hist),
            )
            for (agent, capability, status), cell in inbound.items()
        )
        return StatsReport(
            reporter=self.name[:128],
            scheme=LATENCY_SCHEME,
            start=datetime.fromtimestamp(start, UTC),
            end=datetime.fromtimestamp(end, UTC),
            entries=entries,
        )

    # ---------------------------------------------------------------- publishing

    async def start(self, conn: NatsConnection, bucket: str, who: str) -> None:
        """Publish a report every ``interval`` and answer tap requests (needs a connection).

        ``who`` names the publisher in the subject (see :func:`stats_subject`).
        """
        self._conn = conn
        self._bucket = bucket
        self._who = who
        self._sub = await conn.subscribe(tap_control_subject(bucket), cb=self._on_tap_request)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._report_loop()), loop.create_task(self._tap_loop())]

    async def close(self) -> None:
        """Stop publishing, after a last report of the calls not reported yet."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await stop_task(task, f"stats publishing of {self.name}")
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_WAIT):
                    await sub.unsubscribe()
        if self._conn is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAIT):
                    await self.publish()
        self._taps.clear()
        self._conn = None

    async def publish(self) -> None:
        """Publish the current interval now (the loop does this every ``interval``)."""
        report = self.take()
        if report is None or self._conn is None:
            return
        try:
            await self._conn.client.publish(
                stats_subject(self._bucket, self._who), report.model_dump_json().encode()
            )
        except Exception as exc:
            _log.debug("stats report of %s not published: %s", self.name, exc)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.publish()

    async def _on_tap_request(self, msg: Msg) -> None:
        try:
            request = TapRequest.model_validate_json(msg.data)
        except ValidationError:
            return
        if request.capability not in self.serving:
            return
        now = time.monotonic()
        tap = self._taps.get(request.capability)
        expiry = now + request.ttl
        payloads = request.payloads and self.tap_payloads
        if tap is None or now > tap[0]:
            self._taps[request.capability] = [expiry, expiry if payloads else 0.0]
        else:
            tap[0] = max(tap[0], expiry)
            if payloads:
                tap[1] = max(tap[1], expiry)
        if msg.reply and self._conn is not None:
            ack = TapAck(instance_id=self.name, agent=self.agent or "-", payloads=payloads)
            with contextlib.suppress(Exception):
                await self._conn.client.publish(msg.reply, ack.model_dump_json().encode())

    async def _tap_loop(self) -> None:
        while True:
            await self._tap_wake.wait()
            self._tap_wake.clear()
            while self._tap_queue:
                item = self._tap_queue.popleft()
                subject = tap_subject(self._bucket, item[2])
                try:
                    await self._conn_publish(subject, _tap_event(self.name, item))
                except Exception as exc:
                    _log.debug("tap event of %s not published: %s", self.name, exc)

    async def _conn_publish(self, subject: str, data: bytes) -> None:
        if self._conn is not None:
            await self._conn.client.publish(subject, data)


def _sparse(hist: list[int]) -> list[tuple[int, int]]:
    return [(i, n) for i, n in enumerate(hist) if n]


def _tap_event(instance_id: str, item: _TapItem) -> bytes:
    at, agent, capability, caller, status, elapsed, trace_id, request, response = item
    event = TapEvent(
        at=datetime.fromtimestamp(at, UTC),
        capability=capability,
        agent=agent,
        instance_id=instance_id,
        caller=caller,
        status=status,
        duration_ms=round(elapsed * 1000, 3),
        trace_id=trace_id,
        request=_text(request),
        response=_text(response),
    )
    return event.model_dump_json(exclude_none=True).encode()


def _text(body: bytes | None) -> str | None:
    if body is None:
        return None
    text = body[: _TAP_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")
    if len(text) > _TAP_PAYLOAD_CHARS:
        text = text[:_TAP_PAYLOAD_CHARS] + "…"
    return text
