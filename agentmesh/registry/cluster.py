"""NATS as a set of servers: seed lists, the cluster's advertised URLs, following a moved NATS.

A mesh that outgrows one machine runs on a NATS cluster. Clients are given seeds
(``AGENTMESH_NATS_URL=nats://a:4222,nats://b:4222``) and learn the other nodes from the servers'
INFO (``connect_urls``), so losing a node costs a reconnect, not an outage. The control plane hands
out every client URL it knows in the bootstrap document.

An agent that bootstrapped from the control plane also follows NATS when it moves: when NATS has
been unreachable for a while (``AGENTMESH_NATS_REBOOTSTRAP_AFTER``), it asks the control plane
again and gives nats-py the new server list (its public ``set_server_pool``), so the reconnect loop
that is already running reaches the new address; subscriptions and watches resume as after any
reconnect. An agent never needs a restart because NATS came back elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from agentmesh._tasks import stop_task
from agentmesh.errors import ConfigurationError, MeshError

if TYPE_CHECKING:
    from agentmesh.registry.connection import NatsConnection

__all__ = [
    "BucketReplicas",
    "Rebootstrap",
    "ServerFollower",
    "advertised_servers",
    "bucket_replicas",
    "default_replicas",
    "kv_stream",
    "raise_replicas",
    "split_urls",
    "through_election",
]

_log = logging.getLogger("agentmesh.registry")

T = TypeVar("T")

Rebootstrap = Callable[[], Awaitable[list[str]]]
"""Where the NATS servers are now (normally: ask the control plane for its bootstrap)."""


def split_urls(urls: str | list[str]) -> list[str]:
    """``"nats://a:4222, nats://b:4222"`` → ``["nats://a:4222", "nats://b:4222"]`` (deduplicated).

    A bare ``host:port`` gets the ``nats://`` scheme, as nats-py would give it.
    """
    parts = urls.split(",") if isinstance(urls, str) else urls
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        url = part if "://" in part else f"nats://{part}"
        if url not in out:
            out.append(url)
    if not out:
        raise ConfigurationError(f"no NATS server URL in {urls!r}")
    return out


def advertised_servers(client: Any) -> list[str]:
    """Every client URL a connected nats-py client knows: its seeds plus the servers the cluster
    advertised (INFO ``connect_urls``), which is what a joining agent should be handed."""
    urls: list[str] = []
    for uri in client.servers:
        scheme = uri.scheme or "nats"
        url = f"{scheme}://{uri.hostname}:{uri.port or 4222}"
        if ":" in (uri.hostname or ""):
            url = f"{scheme}://[{uri.hostname}]:{uri.port or 4222}"
        if url not in urls:
            urls.append(url)
    return urls


class ServerFollower:
    """While NATS is lost, re-asks for the server list every ``after`` seconds and follows it."""

    def __init__(self, conn: NatsConnection, source: Rebootstrap, after: float) -> None:
        self._conn = conn
        self._source = source
        self._after = after
        self._task: asyncio.Task[None] | None = None

    def lost(self) -> None:
        """NATS went away: start watching the clock (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name=f"rebootstrap:{self._conn.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task, f"following the NATS servers of {self._conn.name}")

    async def _follow(self) -> None:
        while not self._conn.connected.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._after):
                    await self._conn.connected.wait()
                return
            try:
                servers = split_urls(await self._source())
            except MeshError as exc:
                _log.warning(
                    "NATS at %s away for %gs; control plane not reachable either (%s)",
                    self._conn.url,
                    self._after,
                    exc,
                )
                continue
            self._use(servers)

    def _use(self, servers: list[str]) -> None:
        if servers == self._conn.servers:
            return
        try:
            self._conn.client.set_server_pool(servers)
        except Exception as exc:  # closed meanwhile: nothing left to follow
            _log.debug("server list not applied: %s", exc)
            return
        _log.warning(
            "NATS moved: following the control plane from %s to %s",
            self._conn.url,
            ",".join(servers),
        )
        self._conn.servers = servers
        self._conn.url = ",".join(servers)


def default_replicas(client: Any) -> int:
    """min(3, servers known to the client): R3 on a cluster of three or more (quorum survives
    the loss of one node), R1 on a single server (more replicas than servers cannot be placed)."""
    return max(1, min(3, len(advertised_servers(client))))


@dataclass(frozen=True)
class BucketReplicas:
    """Where a KV bucket's stream lives: its replica count, leader and peers (``name``,
    up to date or not); an empty leader means no leader is elected right now."""

    bucket: str
    replicas: int
    leader: str
    peers: tuple[tuple[str, bool], ...]


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind KV bucket ``bucket``."""
    return f"KV_{bucket}"


_INFO_TIMEOUT = 3.0
"""Seconds for one stream-info answer in a diagnostic (``agentmesh check``, the tests): as long
as check's other probes; a leaderless bucket is reported, not waited for."""
_FIRST_RETRY = 0.2
_MAX_RETRY = 2.0
"""Pauses between JetStream retries during an election, doubling from ``_FIRST_RETRY``: not an
operator's choice (how long to keep trying is: AGENTMESH_JETSTREAM_WAIT); an election takes
4-9 s, so a new leader is found within ``_MAX_RETRY`` of its arrival."""


async def bucket_replicas(
    client: Any, bucket: str, timeout: float = _INFO_TIMEOUT
) -> BucketReplicas:
    """The stream info's cluster view of ``bucket`` (raises nats' NotFoundError if absent)."""
    info = await client.jetstream(timeout=timeout).stream_info(kv_stream(bucket))
    cluster = info.cluster
    peers: list[tuple[str, bool]] = []
    if cluster is not None:
        peers = [(p.name or "?", bool(p.current)) for p in cluster.replicas or []]
    return BucketReplicas(
        bucket=bucket,
        replicas=int(info.config.num_replicas or 1),
        leader=(cluster.leader or "") if cluster is not None else "",
        peers=tuple(peers),
    )


async def raise_replicas(client: Any, buckets: list[str], want: int) -> list[str]:
    """Bring every bucket with fewer than ``want`` replicas up to it (a log line each).

    Buckets created before the cluster grew, or by a process with another setting, keep their
    replica count until someone raises it: the control plane does, at start and after every
    reconnect. Never lowers a count (an operator may have chosen R5). Returns what was raised.
    """
    js = client.jetstream()
    raised: list[str] = []
    for bucket in buckets:
        try:
            info = await js.stream_info(kv_stream(bucket))
        except Exception as exc:  # absent or no leader now: the next reconnect retries
            _log.debug("bucket %s not checked for replicas: %s", bucket, exc)
            continue
        have = int(info.config.num_replicas or 1)
        if have >= want:
            continue
        try:
            await js.update_stream(info.config, num_replicas=want)
        except Exception as exc:
            _log.warning("bucket %s stays at %d replicas (wanted %d): %s", bucket, have, want, exc)
            continue
        _log.warning("bucket %s had %d replica(s); raised to %d", bucket, have, want)
        raised.append(bucket)
    return raised


def _unanswered(exc: BaseException) -> bool:
    """JetStream did not answer (a timeout, no responders, 503): nobody leads right now, as
    during a leader election after a node loss (4-9 s in nats-server), or we are reconnecting."""
    import nats.errors
    import nats.js.errors

    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        # With an error code: "JetStream system temporarily unavailable" (no meta leader yet).
        # Without one: nobody answers the JetStream API on this server at all, i.e. JetStream
        # is off there, which no wait cures.
        return exc.err_code is not None
    return isinstance(
        exc,
        nats.errors.TimeoutError
        | nats.errors.ConnectionReconnectingError
        | nats.js.errors.NoStreamResponseError,
    )


async def through_election(op: Callable[[], Awaitable[T]], *, wait: float, what: str) -> T:
    """``op()``, retried while JetStream does not answer, for up to ``wait`` seconds.

    Only for operations that are safe to repeat (opening a bucket, reading) or that check their
    own outcome (a registration compares what it finds with what it wrote).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    pause = _FIRST_RETRY
    while True:
        try:
            return await op()
        except Exception as exc:
            if not _unanswered(exc) or loop.time() + pause > deadline:
                raise
            _log.info("%s: JetStream did not answer (%s); retrying", what, exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, _MAX_RETRY)
