"""Golden metrics: the control plane's StatsBook, ``GET /v1/stats`` and ``agentmesh stat``.

The end-to-end test runs a known workload through in-process agents (real NATS, real HTTP)
and reads the numbers back from a real control process, over HTTP and through the CLI.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentmesh import Mesh, RemoteAgentError, Settings, capability
from agentmesh.control.feed import speaks_for
from agentmesh.control.stats import StatsBook
from agentmesh.models import StatRow, StatsEntry, StatsReport
from agentmesh.security.files import admin_token
from agentmesh.telemetry.stats import LATENCY_SCHEME, StatsCollector, bucket_of
from tests.control.control_process import arun_cli, cli_env, control_process, control_tls

# --------------------------------------------------------------------------------------
# StatsBook on its own: windows, groups, merging
# --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(*entries: StatsEntry, reporter: str = "s-1", scheme: str = LATENCY_SCHEME) -> bytes:
    at = datetime.now(UTC)
    return (
        StatsReport(reporter=reporter, scheme=scheme, start=at, end=at, entries=list(entries))
        .model_dump_json()
        .encode()
    )


def out(caller: str, cap: str, callee: str, status: str, count: int, seconds: float) -> StatsEntry:
    return StatsEntry(
        direction="outbound",
        agent=caller,
        capability=cap,
        peer=callee,
        status=status,
        count=count,
        total=count * seconds,
        buckets=[(bucket_of(seconds), count)],
    )


def inb(agent: str, cap: str, status: int, count: int, seconds: float) -> StatsEntry:
    return StatsEntry(
        direction="inbound",
        agent=agent,
        capability=cap,
        status=str(status),
        count=count,
        total=count * seconds,
        buckets=[(bucket_of(seconds), count)],
    )


def by_name(rows: list[StatRow]) -> dict[str, StatRow]:
    return {r.name: r for r in rows}


def test_groups_merge_reporters_and_classify_failures():
    clock = Clock()
    book = StatsBook(clock=clock)
    book.apply(
        report(
            out("front", "work", "worker", "ok", 8, 0.010),
            out("front", "work", "worker", "error", 2, 0.020),
            out("front", "work", "-", "error", 1, 0.0001),
            inb("front", "fanout", 200, 2, 0.100),
            reporter="front-1",
        )
    )
    clock.now += 2
    book.apply(
        report(
            inb("worker", "work", 200, 8, 0.009),
            inb("worker", "work", 500, 2, 0.019),
            inb("worker", "work", 422, 1, 0.001),
            reporter="worker-1",
        )
    )
    clock.now += 30

    agents = by_name(book.rows("agents", 60))
    assert set(agents) == {"front", "worker"}
    assert (agents["worker"].requests, agents["worker"].failures) == (11, 2)
    assert agents["worker"].success_rate == pytest.approx(9 / 11)  # a 422 is the caller's fault
    assert agents["front"].success_rate == 1.0

    caps = by_name(book.rows("capabilities", 60))
    assert (caps["work"].requests, caps["work"].failures) == (11, 3)
    assert "fanout" not in caps  # capabilities count what callers asked for (outbound)

    edges = by_name(book.rows("edges", 60))
    assert set(edges) == {"front -> worker", "front -> -"}
    edge = edges["front -> worker"]
    assert (edge.caller, edge.callee, edge.requests, edge.failures) == ("front", "worker", 10, 2)
    assert edge.success_rate == 0.8
    assert edge.p50_ms is not None
    assert 10 / 1.19 <= edge.p50_ms <= 10 * 1.19
    assert edge.p99_ms is not None
    assert 20 / 1.19 <= edge.p99_ms <= 20 * 1.19
    assert edge.window == 32.0
    assert edge.rps == pytest.approx(10 / 32, abs=1e-3)
    assert book.reporters(60) == ["front-1", "worker-1"]


def test_windows_slide_and_old_slots_are_forgotten():
    clock = Clock()
    book = StatsBook(clock=clock, horizon=300)
    book.apply(report(out("a", "x", "b", "ok", 5, 0.01)))
    clock.now += 100
    book.apply(report(out("a", "x", "b", "ok", 3, 0.01)))
    clock.now += 5
    assert by_name(book.rows("edges", 10))["a -> b"].requests == 3
    assert by_name(book.rows("edges", 300))["a -> b"].requests == 8
    assert book.rows("edges", 10)[0].window == 10
    clock.now += 250  # the first report is now 355 s old: beyond the horizon
    book.apply(report(out("a", "x", "b", "ok", 1, 0.01)))
    assert by_name(book.rows("edges", 300))["a -> b"].requests == 4
    assert book.rows("edges", 1e9)[0].window == 300  # clamped to the horizon
    clock.now += 400
    assert book.rows("edges", 300) == []


def test_foreign_and_malformed_reports_are_ignored():
    book = StatsBook()
    book.apply(b"not json")
    book.apply(b'{"reporter": "x"}')
    book.apply(report(out("a", "x", "b", "ok", 5, 0.01), scheme="linear:1ms:100"))
    assert book.rows("edges", 60) == []


def test_made_up_keys_stop_at_the_cap_and_room_returns_as_slots_age(
    caplog: pytest.LogCaptureFixture,
):
    clock = Clock()
    book = StatsBook(clock=clock, horizon=10, max_keys=5)
    book.apply(report(*(out("a", f"cap-{i}", "b", "ok", 1, 0.01) for i in range(8))))
    assert [r.name for r in book.rows("capabilities", 10)] == [f"cap-{i}" for i in range(5)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "agentmesh.control.stats"]
    assert warnings == [  # three dropped, one line a minute
        "stats: 1 entries dropped (last from s-1): the book holds its limit of 5 keys"
    ]
    # Known keys still count once full.
    book.apply(report(out("a", "cap-0", "b", "ok", 2, 0.01)))
    assert book.rows("capabilities", 10)[0].requests == 3
    # Once the full slot ages out of the horizon, new keys fit again.
    clock.now += 20
    book.apply(report(out("a", "fresh", "b", "ok", 1, 0.01)))
    assert [r.name for r in book.rows("capabilities", 10)] == ["fresh"]


def test_a_collector_report_round_trips_into_the_book():
    collector = StatsCollector("client-1")
    for _ in range(4):
        collector.outbound("client", "work", "worker", True, 0.004)
    produced = collector.take()
    assert produced is not None
    book = StatsBook()
    book.apply(produced.model_dump_json().encode())
    (row,) = book.rows("edges", 60)
    assert (row.name, row.requests, row.success_rate) == ("client -> worker", 4, 1.0)


# --------------------------------------------------------------------------------------
# A known workload through real agents, read back from a real control process
# --------------------------------------------------------------------------------------


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, with stats reported every 0.2 s instead of 2 s."""
    return settings.model_copy(update={"stats_interval": 0.2})


@capability
async def work(n: int) -> int:
    return n * 2


@capability
async def fail() -> int:
    raise RuntimeError("always fails")


@capability
async def fanout(k: int, mesh: Mesh) -> int:
    total = 0
    for i in range(k):
        total += await mesh.call("work", {"n": i})
    return total


EXPECTED = {
    # group: {name: (requests, failures)}
    "edges": {"client -> worker": (10, 3), "client -> front": (2, 0), "front -> worker": (8, 0)},
    "capabilities": {"work": (15, 0), "fail": (3, 3), "fanout": (2, 0)},
    "agents": {"worker": (18, 3), "front": (2, 0)},
}


def counts(rows: list[dict[str, Any]]) -> dict[str, tuple[object, object]]:
    return {str(r["name"]): (r["requests"], r["failures"]) for r in rows}


async def test_stat_numbers_match_a_known_workload(
    start_agent, mesh: Mesh, nats_url: str, bucket: str, tmp_path: Path, wait_until
):
    with control_process(nats_url, bucket, tmp_path) as control_url:
        await start_agent([work, fail], name="worker")
        await start_agent([fanout], name="front")
        for n in range(7):
            assert await mesh.call("work", {"n": n}) == 2 * n
        for _ in range(3):
            with pytest.raises(RemoteAgentError):
                await mesh.call("fail", retries=0)
        for _ in range(2):
            assert await mesh.call("fanout", {"k": 4}) == 12

        token = admin_token(Settings(data_dir=tmp_path))
        auth = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=control_url, headers=auth, verify=control_tls(tmp_path)
        ) as http:

            async def rows(group: str) -> list[dict[str, Any]]:
                resp = await http.get("/v1/stats", params={"group": group, "window": 60})
                assert resp.status_code == 200, resp.text
                return list(resp.json())

            async def complete() -> bool:
                for group, expected in EXPECTED.items():
                    if counts(await rows(group)) != expected:
                        return False
                return True

            await wait_until(complete, timeout=10, interval=0.1)
            edges = {r["name"]: r for r in await rows("edges")}
            assert edges["client -> worker"]["success_rate"] == 0.7
            assert edges["front -> worker"]["success_rate"] == 1.0
            for row in edges.values():
                assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
                assert row["rps"] > 0
            agents = {r["name"]: r for r in await rows("agents")}
            assert agents["worker"]["success_rate"] == pytest.approx(15 / 18)
            bad = await http.get("/v1/stats", params={"group": "pods"})
            assert bad.status_code == 422

        env = cli_env({"AGENTMESH_CONTROL_URL": control_url, "AGENTMESH_DATA_DIR": str(tmp_path)})
        done = await arun_cli("stat", "edges", "--window", "60", "-o", "json", env=env)
        assert done.returncode == 0, done.stderr
        assert counts(json.loads(done.stdout)) == EXPECTED["edges"]
        table = await arun_cli("stat", "agents", env=env)
        assert table.returncode == 0, table.stderr
        header = next(line for line in table.stdout.splitlines() if "NAME" in line)
        assert header.split()[1:8:] == ["NAME", "┃", "REQUESTS", "┃", "RPS", "┃", "SUCCESS"]
        worker = next(line for line in table.stdout.splitlines() if " worker " in line)
        top = await arun_cli("top", "--once", "--window", "60", env=env)
        assert top.returncode == 0, top.stderr
        lines = top.stdout.splitlines()
        assert "busiest capabilities" in lines[0]
        busiest = next(line for line in lines if "│" in line)
        assert busiest.split()[1:3] == ["work", "│"]  # 15 calls: more than fail (3), fanout (2)
        assert " 18 " in worker
        assert "83.33%" in worker


def test_a_publisher_speaks_only_for_its_own_instances():
    """The rule the control plane's feed applies to every report and breaker event."""
    assert speaks_for("summarizer", "summarizer-0123abcd")
    assert not speaks_for("summarizer", "writer-0123abcd")
    assert not speaks_for("summarizer", "summarizer-0123abcde")
    assert not speaks_for("a", "a-b-0123abcd")  # an instance of agent "a-b"
    assert not speaks_for("summarizer", "summarizer")
    assert speaks_for("client", "client-laptop-4242")
    assert speaks_for("control", "control-host.example")
    assert not speaks_for("client", "summarizer-0123abcd")
