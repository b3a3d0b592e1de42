"""S4 and S7: resolving from the local index at scale, and agent start-up to first call.

``python bench/registry.py [--records N] [--starts K]``

- S4: a LocalIndex fed 10,000 agent records (100 capabilities × 100 instances); the time to
  resolve a capability and let the balancer choose an endpoint, per call, as p50/p99 over many
  calls. Goal: p99 < 5 µs, no I/O (the index is in memory by construction: nothing to await).
- S5: a registration (and a deregistration) seen by 50 watching sidecars, each with its own NATS
  connection and watch; p99 over every watcher and round. Goal: p99 < 50 ms.
- S6: 10,000 records already in the registry: a new sidecar process's initial sync (connect,
  watch, full view) and its peak RSS. Goals: < 2 s, < 150 MB.
- S7: ``agentmesh run`` of a small agent, from process start to the first successful call to it
  from another process (this one), median of K starts; plaintext (``AGENTMESH_MTLS=off``).
  Goal: median ≤ 250 ms.

Standalone: these are not comparisons with baselines, so they stay out of ``run.py``'s rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentmesh import AgentRecord, CapabilitySpec, Mesh, Settings, connect
from agentmesh.errors import MeshError
from agentmesh.nats_server import NatsServer
from agentmesh.registry import Lease, LocalIndex, NatsConnection, RegistryStore
from agentmesh.sidecar.balance import BalanceLayer
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.endpoints import Endpoints

AGENT_FILE = Path(__file__).with_name("_echo_agent.py")


def _records(n: int, capabilities: int) -> dict[str, bytes]:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    snapshot = {}
    for i in range(n):
        spec = CapabilitySpec(
            name=f"cap{i % capabilities}", input_schema=schema, output_schema={}, version="1.0.0"
        )
        record = AgentRecord(
            instance_id=f"agent-{i:08x}",
            name="agent",
            endpoint=f"http://10.0.{i // 250}.{i % 250}:8000",
            capabilities=(spec,),
        )
        snapshot[record.instance_id] = record.model_dump_json().encode()
    return snapshot


async def _never(call: OutboundCall) -> Reply:
    raise AssertionError("S4 resolves and chooses only")


def s4(records: int, samples: int) -> None:
    index = LocalIndex()
    started = time.perf_counter()
    index.replace(_records(records, capabilities=100))
    built = time.perf_counter() - started
    balance = BalanceLayer(_never, Endpoints(index))
    timings = []
    for i in range(samples):
        capability = f"cap{i % 100}"
        t0 = time.perf_counter_ns()
        call = OutboundCall(capability, b"{}", deadline=0.0, timeout=1.0)
        call.targets = index.targets(capability)
        balance.choose(call)
        timings.append(time.perf_counter_ns() - t0)
    timings.sort()
    p50 = timings[len(timings) // 2] / 1000
    p99 = timings[int(len(timings) * 0.99)] / 1000
    verdict = "met" if p99 < 5 else "missed"
    print(f"S4  {records} records indexed in {built:.2f} s; resolve + choose over {samples} calls:")
    print(f"    p50 {p50:.2f} µs, p99 {p99:.2f} µs (goal p99 < 5 µs: {verdict})")


async def s7(starts: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s7-"))
    nats = NatsServer(workdir / "nats")
    nats.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env.update(AGENTMESH_NATS_URL=nats.url, AGENTMESH_MTLS="off", AGENTMESH_DATA_DIR=str(workdir))
    results = []
    try:
        async with connect(Settings(nats_url=nats.url, mtls="off", data_dir=workdir)) as mesh:
            for i in range(starts):
                name = f"s7-{i}"
                args = [sys.executable, "-m", "agentmesh", "run", str(AGENT_FILE), "--name", name]
                started = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    *args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                try:
                    while True:
                        try:
                            await mesh.call("echo", _PAYLOAD, retries=0)
                            break  # the previous agent is gone: only the new one can answer
                        except MeshError:
                            pass
                        if time.perf_counter() - started > 20:
                            raise TimeoutError(f"{name} not callable within 20 s")
                        await asyncio.sleep(0.002)
                    results.append(time.perf_counter() - started)
                finally:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)
                await _until_gone(mesh, name)
    finally:
        nats.stop()
    median = statistics.median(results) * 1000
    verdict = "met" if median <= 250 else "missed"
    shown = ", ".join(f"{r * 1000:.0f}" for r in results)
    print(f"S7  agent start → first successful call, {starts} starts: {shown} ms")
    print(f"    median {median:.0f} ms (goal ≤ 250 ms: {verdict})")


_PAYLOAD = {"id": 1, "agent": "s7", "tags": [], "params": {}, "text": "x"}


async def _until_gone(mesh: Mesh, name: str) -> None:
    for _ in range(1000):
        if not any(r.name == name for r in mesh.sidecar.index.records()):
            return
        await asyncio.sleep(0.01)


async def s5(watchers: int, rounds: int) -> None:
    """A registration, then a deregistration, seen by every one of ``watchers`` sidecars."""
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s5-"))
    nats = NatsServer(workdir / "nats")
    nats.start()
    bucket = "bench_s5"
    views: list[tuple[NatsConnection, LocalIndex]] = []
    try:
        for i in range(watchers):
            conn = NatsConnection(nats.url, name=f"watcher-{i}")
            await conn.connect()
            store = RegistryStore(conn, bucket)
            await store.open()
            index = LocalIndex()
            index.start(store, conn)
            await index.wait_synced(10)
            views.append((conn, index))
        writer_conn = NatsConnection(nats.url, name="writer")
        await writer_conn.connect()
        writer = RegistryStore(writer_conn, bucket)
        await writer.open()
        appear: list[float] = []
        vanish: list[float] = []
        for r in range(rounds):
            record = next(iter(_records(1, 1).values()))
            rec = AgentRecord.model_validate_json(record).model_copy(
                update={"instance_id": f"agent-s5-{r}"}
            )
            lease = Lease(writer, rec, interval=1.0, ttl=10)
            started = time.perf_counter()
            await lease.acquire()
            appear.extend(await _seen(views, rec.instance_id, True, started))
            started = time.perf_counter()
            await lease.release()
            vanish.extend(await _seen(views, rec.instance_id, False, started))
        await writer_conn.close()
    finally:
        for conn, index in views:
            await index.stop()
            await conn.close()
        nats.stop()
    for label, values in (("registration", appear), ("deregistration", vanish)):
        values.sort()
        p99 = values[int(len(values) * 0.99)] * 1000
        verdict = "met" if p99 < 50 else "missed"
        print(
            f"S5  {label} seen by {watchers} watching sidecars, {rounds} rounds: "
            f"p50 {values[len(values) // 2] * 1000:.1f} ms, p99 {p99:.1f} ms "
            f"(goal p99 < 50 ms: {verdict})"
        )


async def _seen(
    views: list[tuple[NatsConnection, LocalIndex]], instance_id: str, present: bool, since: float
) -> list[float]:
    """Seconds until each index has (or has lost) ``instance_id``, polled every 0.5 ms."""
    pending = {id(index): index for _, index in views}
    times: list[float] = []
    deadline = since + 10
    while pending:
        for key, index in list(pending.items()):
            if any(r.instance_id == instance_id for r in index.records()) is present:
                times.append(time.perf_counter() - since)
                del pending[key]
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(pending)} watchers did not see {instance_id} within 10 s")
        await asyncio.sleep(0.0005)
    return times


async def s6(records: int) -> None:
    """A new sidecar's initial sync of ``records`` records: time to the full view, and its RSS."""
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s6-"))
    nats = NatsServer(workdir / "nats")
    nats.start()
    bucket = "bench_s6"
    try:
        conn = NatsConnection(nats.url, name="writer")
        await conn.connect()
        store = RegistryStore(conn, bucket)
        await store.open()
        js = conn.client.jetstream()
        values = list(_records(records, capabilities=100).items())
        for start in range(0, len(values), 500):
            await asyncio.gather(
                *(
                    js.publish(f"$KV.{bucket}.{key}", value)
                    for key, value in values[start : start + 500]
                )
            )
        await conn.close()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--s6-child",
            nats.url,
            bucket,
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(child.communicate(), 120)
    finally:
        nats.stop()
    seconds, rss_mb, seen = (float(x) for x in out.decode().split())
    sync = "met" if seconds < 2 else "missed"
    memory = "met" if rss_mb < 150 else "missed"
    print(
        f"S6  new sidecar, {int(seen)} records: initial sync {seconds:.2f} s (goal < 2 s: {sync}); "
        f"peak RSS {rss_mb:.0f} MB (goal < 150 MB: {memory})"
    )


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


async def _s6_child(url: str, bucket: str) -> None:
    """Run in a fresh process: connect, watch, wait for the full view; print time and RSS."""
    started = time.perf_counter()
    conn = NatsConnection(url, name="s6-new-sidecar")
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    index = LocalIndex()
    index.start(store, conn)
    await index.wait_synced(60)
    seconds = time.perf_counter() - started
    print(seconds, _peak_rss_mb(), len(index.records()))
    await index.stop()
    await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--s6-child", nargs=2, metavar=("NATS_URL", "BUCKET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.s6_child:
        asyncio.run(_s6_child(*args.s6_child))
        return 0
    s4(args.records, args.samples)
    asyncio.run(s5(args.watchers, args.rounds))
    asyncio.run(s6(args.records))
    asyncio.run(s7(args.starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
