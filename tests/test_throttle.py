"""DropLog: a flood of drops is one warning a minute, each with the count since the last."""

from __future__ import annotations

import logging

from agentmesh._throttle import DropLog


def test_drops_are_counted_and_warned_about_once_per_period(caplog):
    now = [0.0]
    drops = DropLog(logging.getLogger("test.droplog"), every=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.droplog"):
        for _ in range(500):
            drops.drop("dropped %d of %s", "x")
        now[0] = 59.0
        drops.drop("dropped %d of %s", "x")
        now[0] = 60.0
        drops.drop("dropped %d of %s", "x")
    assert [r.getMessage() for r in caplog.records] == ["dropped 1 of x", "dropped 501 of x"]
