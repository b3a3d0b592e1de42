"""Controlled experiments behind ``docs/benchmarks.md``'s cost analysis.

``python bench/ablate.py stack``
    CPU per call of the client's outbound stack with a null transport (no network, no
    agent): ``asyncio.timeout_at`` alone, the deadline alone (``DeadlineLayer``, with
    ``AttemptTimeoutLayer`` where that holds the timer), the whole stack, and
    ``Mesh.call`` on top. Best of 5 × ``--calls / 5`` calls, ``time.process_time``.

``python bench/ablate.py agent-env``
    Agent CPU per call (``/proc``) under agent environment variants, with M1 agents started
    side by side and measured round-robin at 1 and 32 in flight: the defaults, the access log
    off, tracing off, tracing always on. Each variant is one ``MeshCall`` target.

``python bench/ablate.py stats``
    CPU per call of the stats collector's outbound and inbound recorders (what every call pays
    for ``/v1/stats``; the brief is < 2 µs). Best of 5 × 20,000 calls, ``timeit``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loops import closed_loop
from bench.mesh_targets import AGENT_FILE, AGENT_NAME, CAPABILITY, MeshCall
from bench.procfs import proc_cpu_seconds
from bench.workloads import make_payload

__all__ = ["AGENT_VARIANTS", "main"]

AGENT_VARIANTS: dict[str, dict[str, str]] = {
    "defaults": {},
    "AGENTMESH_ACCESS_LOG=false": {"AGENTMESH_ACCESS_LOG": "false"},
    "access log off, OTEL_TRACES_SAMPLER=always_off": {
        "AGENTMESH_ACCESS_LOG": "false",
        "OTEL_TRACES_SAMPLER": "always_off",
    },
    "access log off, OTEL_TRACES_SAMPLER=always_on": {
        "AGENTMESH_ACCESS_LOG": "false",
        "OTEL_TRACES_SAMPLER": "always_on",
    },
}


async def _best_us(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(2000):
        await fn()
    batch = max(1, calls // 5)
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(batch):
            await fn()
        best = min(best, (time.process_time() - t0) / batch * 1e6)
    return best


async def _stack(calls: int) -> None:
    from agentmesh.cli.run import load_agent
    from agentmesh.mesh import Mesh
    from agentmesh.registry.index import LocalIndex
    from agentmesh.registry.store import record_key
    from agentmesh.settings import Settings
    from agentmesh.sidecar.call import OutboundCall, Reply
    from agentmesh.sidecar.deadline import DeadlineLayer
    from agentmesh.sidecar.stack import build_outbound

    record = load_agent(AGENT_FILE, AGENT_NAME).record("http://127.0.0.1:1")
    index = LocalIndex()
    index.apply(record_key(record), record.model_dump_json().encode())
    body = make_payload()
    doc = json.loads(body)
    target = index.targets(CAPABILITY)[0]

    async def null_transport(call: OutboundCall) -> Reply:
        return Reply(target, body=body)

    settings = Settings(nats_url="nats://127.0.0.1:1")
    params = inspect.signature(build_outbound).parameters
    extra: dict[str, Any] = {"caller": "bench"} if "caller" in params else {}
    stack = build_outbound(index, null_transport, settings, **extra)
    loop = asyncio.get_running_loop()

    class _Sidecar:  # what Mesh reads of a sidecar
        outbound = stack

    _Sidecar.index = index  # type: ignore[attr-defined]
    mesh = Mesh(cast(Any, _Sidecar), settings, owner=False)
    if "default_timeout" in inspect.signature(DeadlineLayer).parameters:
        from agentmesh.sidecar.deadline import AttemptTimeoutLayer

        # the deadline's timer moved to the attempt timeout: measure the two together
        deadline: Callable[[OutboundCall], Awaitable[Reply]] = DeadlineLayer(
            AttemptTimeoutLayer(null_transport), default_timeout=30.0
        )
    else:
        deadline = DeadlineLayer(null_transport)

    def new_call() -> OutboundCall:
        return OutboundCall(CAPABILITY, body, loop.time() + 30, 30.0)

    async def bare() -> object:
        call = new_call()
        call.target = target
        return await null_transport(call)

    async def timeout_only() -> object:
        async with asyncio.timeout_at(loop.time() + 30):
            return await null_transport(new_call())

    async def deadline_only() -> object:
        call = new_call()
        call.target = target
        return await deadline(call)

    async def whole() -> object:
        return await stack.handler(new_call())

    cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("OutboundCall + null transport", bare),
        ("asyncio.timeout_at around it", timeout_only),
        ("OutboundCall + DeadlineLayer + null transport", deadline_only),
        ("OutboundCall + whole outbound stack + null transport", whole),
        ("Mesh.call(dict) + whole stack + null transport", lambda: mesh.call(CAPABILITY, doc)),
        ("Mesh.call(bytes) + whole stack + null transport", lambda: mesh.call(CAPABILITY, body)),
    ]
    import agentmesh

    print(f"agentmesh from {Path(agentmesh.__file__).parent}; best of 5 x {calls // 5} calls")
    for name, fn in cases:
        print(f"  {name:55s} {await _best_us(fn, calls):7.2f} us/call")


async def _agent_env(seconds: float, rounds: int) -> None:
    targets = {name: MeshCall(agent_env=env) for name, env in AGENT_VARIANTS.items()}
    try:
        await asyncio.gather(*(t.start() for t in targets.values()))
        payload = make_payload()
        results: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for concurrency in (1, 32):
            for _ in range(rounds):
                for name, target in targets.items():
                    pid = target.agents[0].pid
                    await closed_loop(target.call, payload, concurrency, 0.3, None, 10.0)
                    cpu0 = proc_cpu_seconds(pid)
                    raw = await closed_loop(target.call, payload, concurrency, seconds, None, 10.0)
                    n = max(1, len(raw.latencies_ns))
                    entry = ((proc_cpu_seconds(pid) - cpu0) / n * 1e6, n / raw.elapsed_s)
                    results.setdefault((concurrency, name), []).append(entry)
        for (concurrency, name), values in results.items():
            cpu = statistics.median(v[0] for v in values)
            rate = statistics.median(v[1] for v in values)
            print(
                f"{concurrency:2d} in flight  {name:48s} agent {cpu:6.1f} us/call  "
                f"{rate:7,.0f} calls/s"
            )
    finally:
        for target in targets.values():
            await target.stop()


def _stats() -> None:
    from agentmesh.telemetry.stats import StatsCollector

    collector = StatsCollector("bench")
    record_in = collector.inbound_recorder("agent", ["work"])

    def outbound() -> None:
        collector.outbound("caller", "work", "callee", True, 0.0123)

    def inbound() -> None:
        record_in("agent", "work", 200, 0.0123, "caller", "0" * 32, b"{}", b"1")

    for fn in (outbound, inbound):
        best = min(timeit.repeat(fn, number=20_000, repeat=5)) / 20_000
        print(f"  stats collector, {fn.__name__:8} {best * 1e6:6.2f} us/call (brief: < 2 us)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one experiment; see the module docstring."""
    p = argparse.ArgumentParser(prog="bench/ablate.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stack", help="outbound stack cost with a null transport")
    st.add_argument("--calls", type=int, default=40_000)
    ae = sub.add_parser("agent-env", help="agent CPU per call under environment variants")
    ae.add_argument("--seconds", type=float, default=1.5, help="per round (default 1.5)")
    ae.add_argument("--rounds", type=int, default=3, help="median of rounds (default 3)")
    sub.add_parser("stats", help="stats collector cost per recorded call")
    args = p.parse_args(argv)
    if args.command == "stack":
        asyncio.run(_stack(args.calls))
    elif args.command == "stats":
        _stats()
    else:
        asyncio.run(_agent_env(args.seconds, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
