"""One soak worker: ``python bench/_soak_worker.py INSTANCES`` (started by ``bench/soak.py``).

It runs one real agent (``soak``, an idempotent echo) and registers ``INSTANCES - 1`` more
simulated instances of it: records of their own, each kept alive by its own lease on the
worker's one NATS connection, all pointing at the agent's endpoint. So a few processes give the
registry hundreds of instances registering and renewing, and the callers' balancers spread calls
over all of them. It prints one JSON line when every instance is registered and one with its RSS
every ``--report`` seconds; on SIGTERM it deregisters every instance, drains, and exits 0.

Settings come from the environment (``AGENTMESH_NATS_URL`` with the cluster's seeds, the lease
timing, ``AGENTMESH_MTLS``); it imports only ``agentmesh``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import signal
import sys

from agentmesh import Agent, Settings, capability
from agentmesh.registry import Lease


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), report)
        except TimeoutError:
            say(event="rss", rss_kib=rss_kib(), renewals=sum(lease.renewals for lease in leases))
    say(event="stopping", leases=len(leases))
    released = await asyncio.gather(*(lease.release() for lease in leases))
    say(event="released", released=sum(released))
    agent.stop()
    await agent_task
    say(event="stopped", released=sum(released), of=len(leases), rss_kib=rss_kib())


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # bench/soak.py asks for stacks if a stop hangs
    count = int(sys.argv[1])
    every = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    asyncio.run(main(count, every))
