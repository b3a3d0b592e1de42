"""One soak worker: ``python bench/_soak_worker.py INSTANCES`` (started by ``bench/soak.py``).

It runs one real agent (``soak``, an idempotent echo) and registers ``INSTANCES - 1`` more
simulated instances of it: records of their own, each kept alive by its own lease on the
worker's one NATS connection, all pointing at the agent's endpoint. So a few processes give the
registry hundreds of instances registering and renewing, and the callers' balancers spread calls
over all of them. It prints one JSON line when every instance is registered and one with its RSS
every ``--report`` seconds; on SIGTERM it deregisters every instance, drains, and exits 0.
With ``SOAK_TRACEMALLOC=DIR`` it traces its allocations, snapshots them ``TRACE_FROM`` seconds
after registering (warm) and again on SIGTERM, and writes where they grew in between to
``DIR/worker-PID.txt``: what a leak is made of, without a debugger on the machine.

Settings come from the environment (``AGENTMESH_NATS_URL`` with the cluster's seeds, the lease
timing, ``AGENTMESH_MTLS``); it imports only ``agentmesh``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

from agentmesh import Agent, Settings, capability
from agentmesh.registry import Lease

TRACE_FROM = 120.0
"""Seconds after registering before the first snapshot: warm-up growth is not a leak."""
TRACE_FRAMES = 8
"""Frames kept per allocation: enough to see which of our calls reached the library line."""


@capability(idempotent=True)
async def soak(n: int) -> int:
    """Return ``n``: the call is what is measured, not the work."""
    return n


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def snapshot() -> tracemalloc.Snapshot:
    """The live allocations, less tracemalloc's own (the first snapshot is one of them)."""
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def write_growth(first: tracemalloc.Snapshot, out: Path) -> None:
    """The total, the 15 source lines whose live allocations grew most since ``first``, then
    the full tracebacks of the top 3."""
    last = snapshot()
    before, after = (sum(t.size for t in snap.traces) / 1024 for snap in (first, last))
    lines = [
        f"traced Python memory {before:.0f} KiB -> {after:.0f} KiB ({after - before:+.0f} KiB)",
        f"growth after {TRACE_FROM:g}s warm-up until SIGTERM, top 15 by line:",
    ]
    lines += [str(stat) for stat in last.compare_to(first, "lineno")[:15]]
    for stat in last.compare_to(first, "traceback")[:3]:
        lines += ["", str(stat), *stat.traceback.format()]
    out.write_text("\n".join(lines) + "\n")


async def main(instances: int, report: float) -> None:
    settings = Settings()
    agent = Agent("soak", capabilities=[soak])
    ready = asyncio.Event()
    agent_task = asyncio.create_task(
        agent.serve(settings=settings, on_ready=lambda _: ready.set(), handle_signals=False)
    )
    await ready.wait()
    assert agent.mesh is not None
    assert agent.endpoint is not None
    store = agent.mesh.sidecar.store
    template = agent.record(agent.endpoint)
    leases: list[Lease] = []
    for n in range(1, instances):
        record = template.model_copy(update={"instance_id": f"{agent.instance_id}-{n}"})
        lease = Lease(store, record, interval=settings.heartbeat_interval, ttl=settings.lease_ttl)
        await lease.acquire()
        leases.append(lease)
    ids = [agent.instance_id, *(lease.record.instance_id for lease in leases)]
    say(event="registered", instances=ids, rss_kib=rss_kib())
    trace_dir = os.environ.get("SOAK_TRACEMALLOC")
    trace_at = time.monotonic() + TRACE_FROM
    first: tracemalloc.Snapshot | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), report)
        except TimeoutError:
            say(event="rss", rss_kib=rss_kib(), renewals=sum(lease.renewals for lease in leases))
            if trace_dir and first is None and time.monotonic() >= trace_at:
                first = snapshot()
    if first is not None:
        write_growth(first, Path(trace_dir or ".") / f"worker-{os.getpid()}.txt")
    say(event="stopping", leases=len(leases))
    released = await asyncio.gather(*(lease.release() for lease in leases))
    say(event="released", released=sum(released))
    agent.stop()
    await agent_task
    say(event="stopped", released=sum(released), of=len(leases), rss_kib=rss_kib())


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # bench/soak.py asks for stacks if a stop hangs
    if os.environ.get("SOAK_TRACEMALLOC"):
        tracemalloc.start(TRACE_FRAMES)
    count = int(sys.argv[1])
    every = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    asyncio.run(main(count, every))
