"""``agentmesh tap``'s backlog against a real nats-server: a flood of events stays bounded."""

from __future__ import annotations

from nats.aio.msg import Msg

from agentmesh.cli.tap import _Backlog
from agentmesh.registry import NatsConnection
from agentmesh.telemetry.stats import tap_subject

LIMIT = 10
SENT = LIMIT + 1000


async def test_events_past_the_backlog_are_dropped_and_counted(
    nats_url, bucket, capsys, wait_until
):
    conn = NatsConnection(nats_url, name="test-tap-backlog")
    await conn.connect()
    events = _Backlog(LIMIT)

    async def on_event(msg: Msg) -> None:
        events.put(msg.data)

    try:
        subject = tap_subject(bucket, "summarize")
        await conn.subscribe(subject, cb=on_event)
        for i in range(SENT):  # nothing prints meanwhile: a terminal that fell behind
            await conn.client.publish(subject, b"%d" % i)
        await wait_until(lambda: events.queue.qsize() + events.dropped == SENT, timeout=30)
        assert events.queue.qsize() == LIMIT
        assert events.dropped == SENT - LIMIT
        assert await events.get() == b"0"  # the oldest are kept, the newest dropped
        assert f"({SENT - LIMIT} calls not shown" in capsys.readouterr().err
        assert events.dropped == 0
    finally:
        await conn.close()
