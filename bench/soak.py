"""Soak on a three-node NATS cluster: ``python bench/soak.py [--minutes 10] [--instances 300]``.

Starts the three nodes of ``examples/deploy`` on loopback (``tests/nats_cluster.py``, R3
buckets), then ``--processes`` worker processes (``bench/_soak_worker.py``) that together
register ``--instances`` agent instances (one real agent per process, the rest simulated:
records with their own leases, renewed every ``--heartbeat`` seconds). This process holds a
client ``Mesh`` sending ``--rate`` calls per second to the ``soak`` capability, spread by its
balancer over every instance, and probes the registry (a write and a read every 0.5 s).
Half-way through, the node leading the registry bucket is SIGKILLed and restarted ``--down``
seconds later. At the end the workers stop gracefully (each deregisters its instances).

Printed: calls sent and failed (goal: 0), the longest time the registry did not take a write
after the kill (what a node loss costs registrations), how long the caller's view missed any
instance, ghost records left after the workers stopped (goal: 0), and the RSS over time of every
process (workers, caller, the three nodes; a sample every ``--sample`` seconds,
``bench/rss_series.py``) with its slope over the first half after warm-up and over the second
half after the restarted node settled: a leak keeps its slope, settling flattens (``--series
FILE`` writes the samples as JSON; ``--tracemalloc DIR`` has each worker write where its Python
allocations grew). Exit status 0 when every goal holds, 1 otherwise. Not a unit test: it runs
for minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh import Agent, Settings, capability, connect
from agentmesh.control.ca import write_root_ca
from agentmesh.registry import RecordConflict
from agentmesh.registry.cluster import bucket_replicas
from agentmesh.registry.store import record_key
from bench.rss_series import RssSeries
from tests.mesh_ca import MeshCA
from tests.nats_cluster import NatsCluster

WORKER = Path(__file__).resolve().parent / "_soak_worker.py"
STOP_TIMEOUT = 120.0
"""Seconds a worker gets to deregister its instances and drain (generous: loaded machines)."""
WARMUP = 120.0
"""Seconds after the calls begin left out of the first-half slope (imports, first TLS
handshakes, pools and caches filling)."""
SETTLE = 60.0
"""Seconds after the restarted node rejoins left out of the second-half slope (catch-up,
reconnects, the new node's own warm-up)."""


@dataclass
class Run:
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    longest_write_stall: float = 0.0
    view_short_seconds: float = 0.0
    events: list[str] = field(default_factory=list)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second")
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--lease", type=int, default=15)
    parser.add_argument("--down", type=float, default=20.0, help="seconds the node stays dead")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--series", type=Path, help="write the RSS samples here (JSON)")
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        help="each worker traces its allocations and writes their growth here (slows it)",
    )
    return parser.parse_args(argv)


def _lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event"' in line:
            out.append(json.loads(line))
    return out


async def _calls(mesh: Any, rate: float, stop: asyncio.Event, run: Run) -> None:
    period = 1.0 / rate
    while not stop.is_set():
        started = time.monotonic()
        try:
            assert await mesh.call("soak", {"n": run.calls}) == run.calls
        except Exception as exc:
            run.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
        run.calls += 1
        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))


@capability
async def soak_probe() -> None:
    """Never called: the probe record's capability."""


async def _probe(
    mesh: Any, ca: MeshCA, ttl: int, stop: asyncio.Event, run: Run, registered: asyncio.Event
) -> None:
    """A registration renewed every 0.5 s in the registry bucket (a record with a capability
    nobody calls, signed as agent ``soak-probe`` so that every index takes it): the longest gap
    between successful renewals is what a node loss costs registrations, renewals and
    deregistrations."""
    store = await ca.store_as(mesh.sidecar.conn, mesh.sidecar.store.bucket, "soak-probe")
    record = Agent("soak-probe", capabilities=[soak_probe]).record("http://127.0.0.1:9")
    record = record.model_copy(update={"identity": "spiffe://agentmesh.local/agent/soak-probe"})
    key = record_key(record)
    revision = await store.create(record, ttl)
    registered.set()
    last_ok = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.5)
        try:
            revision = await asyncio.wait_for(store.renew(record, revision, ttl), 5.0)
        except RecordConflict:  # a renewal that timed out landed after all
            current = await store.get(key)
            if current is not None:
                revision = current[1]
            continue
        except Exception:
            continue
        now = time.monotonic()
        run.longest_write_stall = max(run.longest_write_stall, now - last_ok)
        last_ok = now
    await store.delete(key)


async def _view(
    mesh: Any, expected: int, stop: asyncio.Event, run: Run, registered: asyncio.Event
) -> None:
    """Seconds during which the caller's index held fewer instances than registered."""
    await registered.wait()
    await asyncio.sleep(1.0)  # the probe's record reaches the caller's index
    while not stop.is_set():
        if len(mesh.sidecar.index.records()) < expected:
            run.view_short_seconds += 0.25
        await asyncio.sleep(0.25)


def _spawn(instances: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(instances), "10"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _soak(args: argparse.Namespace, cluster: NatsCluster, root: Path) -> int:
    ca_cert = Path(cluster.ca_env["AGENTMESH_CA_CERT_FILE"])
    ca_key = Path(cluster.ca_env["AGENTMESH_CA_KEY_FILE"])
    bucket = f"soak_{uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_NATS_URL": cluster.seeds,
        "AGENTMESH_REGISTRY_BUCKET": bucket,
        "AGENTMESH_HEARTBEAT_INTERVAL": str(args.heartbeat),
        "AGENTMESH_LEASE_TTL": str(args.lease),
        "AGENTMESH_CA_CERT_FILE": str(ca_cert),
        "AGENTMESH_CA_KEY_FILE": str(ca_key),
        "AGENTMESH_DATA_DIR": str(root),
        "AGENTMESH_ACCESS_LOG": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if args.tracemalloc is not None:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
        env["SOAK_TRACEMALLOC"] = str(args.tracemalloc.resolve())
    per = max(1, args.instances // args.processes)
    logs = [root / f"worker-{i}.log" for i in range(args.processes)]
    workers = [_spawn(per, env, log) for log in logs]
    run = Run()
    try:
        deadline = time.monotonic() + 120
        while not all(any(e["event"] == "registered" for e in _lines(log)) for log in logs):
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                print("workers did not register:", [log.read_text()[-500:] for log in logs])
                return 1
            await asyncio.sleep(0.2)
        expected = per * args.processes
        settings = Settings(
            nats_url=cluster.seeds,
            registry_bucket=bucket,
            ca_cert_file=ca_cert,
            ca_key_file=ca_key,
            data_dir=root,
            access_log=False,
        )
        probe_ca = MeshCA(ca_cert, ca_key)
        series = RssSeries(partial(_pids, cluster, workers))
        async with connect(settings) as mesh:
            stop = asyncio.Event()
            registered = asyncio.Event()
            tasks = [
                asyncio.create_task(_calls(mesh, args.rate, stop, run)),
                asyncio.create_task(_probe(mesh, probe_ca, args.lease, stop, run, registered)),
                asyncio.create_task(_view(mesh, expected + 1, stop, run, registered)),
                asyncio.create_task(_sampling(series, args.sample, stop)),
            ]
            total = args.minutes * 60
            await asyncio.sleep(total / 2)
            info = await bucket_replicas(mesh.sidecar.conn.client, bucket)
            node = info.leader.removeprefix("nats-")
            run.events.append(f"killed nats-{node} (registry leader, R{info.replicas})")
            series.mark("kill")
            cluster.kill(node)
            await asyncio.sleep(args.down)
            started = time.monotonic()
            await asyncio.to_thread(cluster.start)
            series.mark("whole")
            run.events.append(
                f"restarted nats-{node} after {args.down:g}s; cluster whole again in "
                f"{time.monotonic() - started:.1f}s"
            )
            await asyncio.sleep(max(0.0, total - series.now()))
            stop.set()
            await asyncio.gather(*tasks)
            series.sample()
            series.mark("stop")
            print(
                f"  (before stopping the workers: {run.calls} calls, {len(run.failures)} failed, "
                f"longest registry write gap {run.longest_write_stall:.1f}s)",
                flush=True,
            )
            for worker in workers:
                worker.terminate()
            for worker, log in zip(workers, logs, strict=True):
                try:
                    await asyncio.to_thread(worker.wait, STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    worker.send_signal(signal.SIGUSR1)  # its stacks, into its log
                    await asyncio.sleep(1.0)
                    print(
                        f"worker did not stop within {STOP_TIMEOUT:g}s:\n{log.read_text()[-6000:]}"
                    )
                    raise
            await asyncio.sleep(1.0)
            live_now = await _live_keys(mesh, bucket)
            await asyncio.sleep(args.lease + 2)
            live_later = await _live_keys(mesh, bucket)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return _report(args, run, logs, expected, series, live_now, live_later)


def _pids(cluster: NatsCluster, workers: list[subprocess.Popen[bytes]]) -> dict[str, int | None]:
    """The processes whose RSS is sampled, by a name that survives a node's restart."""
    return {
        **{f"worker {n}": w.pid if w.poll() is None else None for n, w in enumerate(workers)},
        "caller": os.getpid(),
        **{f"nats-{node}": server.pid for node, server in cluster.servers.items()},
    }


async def _sampling(series: RssSeries, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        series.sample()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


def _windows(series: RssSeries) -> list[tuple[str, float, float]]:
    """First half after warm-up up to the kill; second half once the restarted node settled."""
    end = series.marks.get("stop", series.now())
    kill = series.marks.get("kill", end / 2)
    whole = series.marks.get("whole", kill)
    return [("1st half", min(WARMUP, kill / 2), kill), ("2nd half", whole + SETTLE, end)]


async def _live_keys(mesh: Any, bucket: str) -> int:
    """Records left in the registry bucket."""
    import nats.js.errors

    try:
        keys = await mesh.sidecar.store.kv.keys()
    except nats.js.errors.NoKeysError:
        return 0
    return len(keys)


def _report(
    args: argparse.Namespace,
    run: Run,
    logs: list[Path],
    expected: int,
    series: RssSeries,
    live_now: int,
    live_later: int,
) -> int:
    print(
        f"soak: {args.minutes:g} min, {expected} instances in {args.processes} processes, "
        f"heartbeat {args.heartbeat:g}s, lease {args.lease}s, {args.rate:g} calls/s, "
        f"3-node cluster (R3)"
    )
    for event in run.events:
        print(f"  {event}")
    rate = len(run.failures) / run.calls if run.calls else 1.0
    print(f"  calls: {run.calls} sent, {len(run.failures)} failed ({rate:.4%})")
    for failure in run.failures[:5]:
        print(f"    {failure}")
    print(
        f"  longest time without a registry write (a record renewed every 0.5 s): "
        f"{run.longest_write_stall:.1f}s"
    )
    failed = sum(log.read_text(errors="replace").count("lease renewal failed") for log in logs)
    print(f"  failed lease renewals in the workers (retried at the next heartbeat): {failed}")
    print(f"  caller's view short of an instance: {run.view_short_seconds:.2f}s in total")
    print(
        f"  ghost records after the workers stopped: {live_now} (after a lease more: {live_later})"
    )
    released = []
    for log in logs:
        stopped = [e for e in _lines(log) if e["event"] == "stopped"]
        released.append(f"{stopped[0]['released']}/{stopped[0]['of']}" if stopped else "?")
    print(f"  simulated instances deregistered per worker: {', '.join(released)}")
    windows = _windows(series)
    for line in series.table(windows, every=300.0):
        print(line)
    if args.series is not None:
        series.write_json(args.series, windows)
        print(f"  RSS samples: {args.series}")
    ok = not run.failures and live_now == 0 and live_later == 0
    print("  goals:", "met" if ok else "MISSED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="agentmesh-soak-") as tmp:
        root = Path(tmp)
        ca_cert, ca_key = write_root_ca(root / "ca", "agentmesh.local")
        ca_env = {"AGENTMESH_CA_CERT_FILE": str(ca_cert), "AGENTMESH_CA_KEY_FILE": str(ca_key)}
        # The secured example cluster; every process here holds the NATS keys (data dir: root).
        cluster = NatsCluster(root / "cluster", root, ca_env)
        try:
            cluster.start()
            return asyncio.run(_soak(args, cluster, root))
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
