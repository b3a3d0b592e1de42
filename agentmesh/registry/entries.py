"""Reading the current entries of a KV bucket once: a listing, not a follow.

nats-py ends a watch's initial values with ``None``. When the values are already in the
client's buffers as the watch starts, that marker comes *first* (seen under load: a policy read
as missing, the control plane's own identity missing from ``identity list``). So an early
marker with nothing read is checked against the stream, and the last entry is recognised by its
``delta`` (messages still pending after it) of 0. The policy and security stores list through
this one reader; :class:`~agentmesh.registry.follow.BucketFollower` handles the same marker for
follows.
"""

from __future__ import annotations

import contextlib
from typing import Any

import nats.errors
from nats.js.kv import KeyValue

from agentmesh.errors import RegistryUnavailable
from agentmesh.registry.connection import NatsConnection

__all__ = ["read_entries", "stream_holds"]

#: Seconds to wait for the next value of a listing: values in the stream reach a subscriber in
#: a round trip, so a longer silence means NATS is unreachable, said as RegistryUnavailable.
_NEXT_VALUE_WAIT = 5.0


async def read_entries(
    conn: NatsConnection, kv: KeyValue, bucket: str, keys: str, *, history: bool = False
) -> list[KeyValue.Entry]:
    """Entries of ``keys`` (a key, or a pattern such as ``pub.>``) in ``bucket``: the latest per
    key (deletions included: filter on ``operation``), or every kept revision with ``history``,
    oldest first."""
    try:
        watcher: Any = await kv.watch(keys, include_history=history)
        entries: list[KeyValue.Entry] = []
        try:
            while True:
                entry = await watcher.updates(timeout=_NEXT_VALUE_WAIT)
                if entry is None:
                    if entries or not await stream_holds(conn, bucket, keys):
                        break
                    continue
                entries.append(entry)
                if entry.delta == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise RegistryUnavailable(f"reading {keys!r} from bucket {bucket!r}: {exc}") from exc
    return entries


async def stream_holds(conn: NatsConnection, bucket: str, keys: str) -> bool:
    """Whether the bucket's stream holds any message for ``keys`` (what an early marker may
    have hidden)."""
    info = await conn.client.jetstream().stream_info(
        f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{keys}"
    )
    return bool(info.state.subjects)
