"""S4 and S7: resolving from the local index at scale, and agent start-up to first call.

``python bench/registry.py [--records N] [--starts K] [--only s7 ...]``

- S4: a LocalIndex fed 10,000 agent records (100 capabilities × 100 instances); the time to
  resolve a capability and let the balancer choose an endpoint, per call, as p50/p99 over many
  calls. Goal: p99 < 5 µs, no I/O (the index is in memory by construction: nothing to await).
- S5: a registration (and a deregistration) seen by 50 watching sidecars, each with its own NATS
  connection and watch; p99 over every watcher and round. Goal: p99 < 50 ms.
- S6: 10,000 records already in the registry: a new sidecar process's initial sync (connect,
  watch, full view, then one call resolved and an endpoint chosen, as its outbound stack does:
  the moment it can route calls) and its peak RSS. Goals: < 2 s, < 150 MB. Its index verifies
  a snapshot's signed records lazily (``registry/index.py``): the ones a call uses first, the
  rest in the background, so S6 also prints when every record was verified (no goal).
- S5 and S6 run as a mesh with mTLS does: every record is signed by its own agent's key (a
  certificate of its own from a throwaway CA), and every watching index checks each record's
  signature and certificate chain (``security/signed.py``) as it takes it.
- S7: ``agentmesh run`` of a small agent, from process start to the first successful call to it
  from another process (this one), median of K starts after an untimed one that fills the
  agents' bytecode cache (as an installed package has one); plaintext (``AGENTMESH_MTLS=off``).
  Goal: median ≤ 250 ms. Also the agent's CPU time (user + system) at that moment, read from
  ``/proc``: on a busy machine the wall time mostly measures the wait for a core, this does not.
- S5-S7 run on NATS as ``agentmesh control`` embeds it (TLS, a user JWT per connection);
  ``BENCH_NATS=plain`` runs them on an open, plaintext NATS, to see what that costs.

These are not comparisons with baselines, so they stay out of ``run.py``'s rounds: ``run.py``
runs them as scenarios s4–s7 of ``agentmesh bench`` (after its targets are stopped), calling these
functions and rendering the dicts they return (nested dicts are table rows; metric keys end in
their unit) with its goals. Run standalone, this file prints its own summary lines.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

from agentmesh import AgentRecord, CapabilitySpec, Mesh, Settings, connect
from agentmesh.control.ca import CertificateAuthority
from agentmesh.errors import MeshError
from agentmesh.nats_config import server_hosts, write_server_config, write_server_tls
from agentmesh.nats_server import NatsServer
from agentmesh.registry import Lease, LocalIndex, NatsConnection, RegistryStore
from agentmesh.registry.connection import Credentials
from agentmesh.registry.store import record_key
from agentmesh.security.files import write_private
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.nats_client import nats_credentials
from agentmesh.security.natsjwt import format_creds
from agentmesh.security.pki import pem
from agentmesh.sidecar.balance import BalanceLayer
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.endpoints import Endpoints
from agentmesh.sidecar.resolve import ResolveLayer

if TYPE_CHECKING:
    from agentmesh.security.signed import StateTrust

AGENT_FILE = Path(__file__).with_name("_echo_agent.py")
_TD = "agentmesh.local"

#: An outbound layer as S4 drives it: a coroutine function, run without an event loop.
Layer = Callable[[OutboundCall], Coroutine[object, None, Reply]]


# ---- the NATS S5-S7 run on ---------------------------------------------------------------------
# As ``agentmesh control`` embeds it: TLS with a certificate from a mesh CA, and JWT accounts, so
# every connection presents a user JWT with its identity's permissions (watchers are clients,
# writers and agents are agents). ``BENCH_NATS=plain`` runs an open, plaintext NATS instead, to
# measure what TLS and authentication cost.

TD = "agentmesh.local"


def agent(name: str) -> SpiffeId:
    return SpiffeId.agent(TD, name)


def client(name: str = "bench") -> SpiffeId:
    return SpiffeId.client(TD, name)


class BenchNats:
    """A nats-server in ``workdir``, and credentials for identities on it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.secure = os.environ.get("BENCH_NATS", "secure") != "plain"
        store = workdir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self._authority: NatsAuthority | None = None
        if not self.secure:
            self.server = NatsServer(store)
            return
        ca = CertificateAuthority.in_directory(workdir / "ca", TD, 3600.0)
        self._authority = NatsAuthority.open(workdir)
        write_server_tls(store, ca, server_hosts("127.0.0.1"))
        config = write_server_config(store, self._authority)
        self.server = NatsServer(store, extra_config=config, tls=True)
        self.ca_file = workdir / "nats-ca.pem"
        self.ca_file.write_text("".join(pem(r) for r in ca.roots))

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def env(self, identity: SpiffeId, bucket: str) -> dict[str, str]:
        """``AGENTMESH_NATS_*`` settings that connect as ``identity`` (a .creds file)."""
        if self._authority is None:
            return {}
        jwt, key = self._authority.own_user(identity, bucket=bucket)
        path = self.workdir / "creds" / f"{identity.kind}-{identity.name}.creds"
        write_private(path, format_creds(jwt, key).encode())
        return {
            "AGENTMESH_NATS_CREDS_FILE": str(path),
            "AGENTMESH_NATS_TLS_CA_FILE": str(self.ca_file),
        }

    def settings(self, identity: SpiffeId, bucket: str, **more: object) -> Settings:
        names = {
            k.removeprefix("AGENTMESH_").lower(): v for k, v in self.env(identity, bucket).items()
        }
        return Settings(nats_url=self.url, registry_bucket=bucket, **names, **more)  # type: ignore[arg-type]

    def credentials(self, identity: SpiffeId, bucket: str) -> Credentials | None:
        """Connect options for a bare ``NatsConnection`` as ``identity``."""
        if not self.secure:
            return None
        return nats_credentials(self.settings(identity, bucket), None)


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
        snapshot[record_key(record)] = record.model_dump_json().encode()
    return snapshot


class _Signing:
    """A throwaway mesh CA: signed records as agents write them, and the trust that checks them."""

    def __init__(self, workdir: Path) -> None:
        from agentmesh.control.ca import CertificateAuthority, write_root_ca

        self.cert_file, key_file = write_root_ca(workdir / "ca", _TD)
        self.ca = CertificateAuthority.from_files(self.cert_file, key_file, _TD, 86400.0)

    def sealer(self) -> Callable[[bytes], bytes]:
        """Signs records as one agent named ``agent`` (a key and certificate of its own)."""
        from agentmesh.security.identity import SpiffeId
        from agentmesh.security.pki import new_key
        from agentmesh.security.signed import seal_record

        key = new_key()
        cert = self.ca.issue(key.public_key(), SpiffeId.agent(_TD, "agent"))
        return lambda record: seal_record(record, key, [cert])

    def signed(self, records: dict[str, bytes]) -> dict[str, bytes]:
        """``records`` as their agents would store them: each signed by a certificate of its own."""
        return {key: self.sealer()(_strict(value)) for key, value in records.items()}


def _strict(record: bytes) -> bytes:
    """A record of ``_records`` as an agent with mTLS on writes it (its identity, mtls strict)."""
    parsed = AgentRecord.model_validate_json(record)
    return (
        parsed.model_copy(
            update={"identity": f"spiffe://{_TD}/agent/{parsed.name}", "mtls": "strict"}
        )
        .model_dump_json()
        .encode()
    )


def _trust(cert_file: Path) -> StateTrust:
    from agentmesh.security.pki import load_certs
    from agentmesh.security.signed import StateTrust

    roots = load_certs(cert_file.read_bytes())
    return StateTrust(lambda: roots, lambda: _TD)


async def _never(call: OutboundCall) -> Reply:
    raise AssertionError("S4 resolves and chooses only")


def _drive(handler: Layer, call: OutboundCall) -> None:
    """Run one call through ``handler`` to completion; it must never suspend (no I/O)."""
    coroutine = handler(call)
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise AssertionError("the resolve path suspended: it is meant to do no I/O")


def _time_calls(handler: Layer, capabilities: list[str], samples: int, warmup: int) -> list[int]:
    """Per-call ns of ``handler``, after ``warmup`` untimed calls; each call is new, untimed."""
    timings = []
    clock = time.perf_counter_ns
    for i in range(-warmup, samples):
        call = OutboundCall(capabilities[i % len(capabilities)], b"{}", deadline=0.0, timeout=1.0)
        t0 = clock()
        _drive(handler, call)
        elapsed = clock() - t0
        if i >= 0:
            timings.append(elapsed)
    timings.sort()
    return timings


def _percentiles(timings: list[int]) -> tuple[float, float, float]:
    """p50, p99 and max, in µs."""
    n = len(timings)
    return timings[n // 2] / 1000, timings[int(n * 0.99)] / 1000, timings[-1] / 1000


def s4(records: int, samples: int) -> dict[str, object]:
    """The outbound hot path's resolve (ResolveLayer) and endpoint choice (BalanceLayer.choose).

    Steady state: every endpoint has a latency estimate and has been considered before, the
    setup's garbage is collected once, then ``warmup`` untimed calls; the GC stays on. The
    OutboundCall is made before each timed call (the caller builds it above these layers), and
    the layers between resolve and balance (policy, route, deadline, retry) are not included.
    """
    index = LocalIndex()
    started = time.perf_counter()
    index.replace(_records(records, capabilities=100))
    built = time.perf_counter() - started
    endpoints = Endpoints(index)
    now = time.monotonic()
    for n, record in enumerate(index.records()):
        endpoints.get(record.instance_id).observe(0.03 + (n % 7) * 0.01, now)
    balance = BalanceLayer(_never, endpoints)
    capabilities = index.capabilities()
    reply = Reply(index.targets(capabilities[0])[0])

    async def resolved(call: OutboundCall) -> Reply:
        return reply

    async def chosen(call: OutboundCall) -> Reply:
        call.target = balance.choose(call)
        return reply

    warmup = min(samples, 10_000)
    gc.collect()
    print(
        f"S4  {records} records indexed in {built:.2f} s; {samples} calls over "
        f"{len(capabilities)} capabilities, each timed alone after {warmup} warm-up calls:"
    )
    result: dict[str, object] = {"records": records, "index_build_s": built, "samples": samples}
    for label, inner in (("resolve", resolved), ("resolve + choose", chosen)):
        timings = _time_calls(ResolveLayer(inner, index), capabilities, samples, warmup)
        p50, p99, worst = _percentiles(timings)
        result[label] = {"p50_us": p50, "p99_us": p99, "max_us": worst}
        verdict = "met" if p99 < 5 else "missed"
        print(
            f"    {label:<16}  p50 {p50:.2f} µs, p99 {p99:.2f} µs, max {worst:.1f} µs "
            f"(goal p99 < 5 µs: {verdict})"
        )
    # Not steady state, so outside the goal: a new sidecar's first call to each capability
    # makes the states of all its endpoints (100 here) at once.
    cold = BalanceLayer(_never, Endpoints(index))

    async def first(call: OutboundCall) -> Reply:
        call.target = cold.choose(call)
        return reply

    timings = _time_calls(ResolveLayer(first, index), capabilities, len(capabilities), 0)
    p50, _, worst = _percentiles(timings)
    result["first call per capability"] = {"p50_us": p50, "max_us": worst}
    print(
        f"    first call to each of the {len(capabilities)} capabilities (makes its endpoints' "
        f"states): p50 {p50:.0f} µs, max {worst:.0f} µs"
    )
    return result


async def s7(starts: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s7-"))
    nats = BenchNats(workdir)
    nats.start()
    bucket = Settings().registry_bucket
    # Bytecode caches, as an installed package has them: ``pip install`` compiles every module,
    # and an editable install writes its caches on its first start, so no user's agent compiles
    # agentmesh's ~200 modules at each start. Where ``PYTHONDONTWRITEBYTECODE`` is set (this
    # sandbox sets it), a checkout has none and every start compiled them (~80 ms of CPU). So
    # the agents read and write bytecode in a cache of this run's own (nothing is written into
    # the checkout), which the untimed first start fills.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTMESH_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(AGENTMESH_NATS_URL=nats.url, AGENTMESH_MTLS="off", AGENTMESH_DATA_DIR=str(workdir))
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    results = []
    cpu: list[float] = []
    try:
        settings = nats.settings(client(), bucket, mtls="off", data_dir=workdir)
        async with connect(settings) as mesh:
            # Untimed: fills the bytecode cache (and the page cache) as any earlier start would.
            env.update(nats.env(agent("s7-warm-up"), bucket))
            await _start_until_called(mesh, env, "s7-warm-up")
            for i in range(starts):
                name = f"s7-{i}"
                env.update(nats.env(agent(name), bucket))
                took, used = await _start_until_called(mesh, env, name)
                results.append(took)
                cpu.extend(used)
    finally:
        nats.stop()
        shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    median = statistics.median(results) * 1000
    verdict = "met" if median <= 250 else "missed"
    shown = ", ".join(f"{r * 1000:.0f}" for r in results)
    print(f"S7  agent start → first successful call, {starts} starts: {shown} ms")
    print(f"    median {median:.0f} ms (goal ≤ 250 ms: {verdict})")
    each = [r * 1000 for r in results]
    result: dict[str, object] = {
        "starts": starts,
        "start → first call": {"median_ms": median, "each_ms": each},
    }
    if cpu:
        print(f"    agent CPU time (user + system) by then: median {statistics.median(cpu):.0f} ms")
        result["agent CPU by first call"] = {"median_ms": statistics.median(cpu), "each_ms": cpu}
    return result


async def _start_until_called(
    mesh: Mesh, env: dict[str, str], name: str
) -> tuple[float, list[float]]:
    """Start agent ``name``; seconds until a call to it succeeded, and its CPU time by then."""
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
        took = time.perf_counter() - started
        used = _cpu_ms(proc.pid)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    await _until_gone(mesh, name)
    return took, used


def _cpu_ms(pid: int) -> list[float]:
    """CPU time (user + system) process ``pid`` has used, in ms; none where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []
    return [(int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")]


_PAYLOAD = {"id": 1, "agent": "s7", "tags": [], "params": {}, "text": "x"}


async def _until_gone(mesh: Mesh, name: str) -> None:
    for _ in range(1000):
        if not any(r.name == name for r in mesh.sidecar.index.records()):
            return
        await asyncio.sleep(0.01)


async def s5(watchers: int, rounds: int) -> dict[str, object]:
    """A registration, then a deregistration, seen by every one of ``watchers`` sidecars."""
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s5-"))
    nats = BenchNats(workdir)
    nats.start()
    bucket = "bench_s5"
    signing = _Signing(workdir)
    views: list[tuple[NatsConnection, LocalIndex]] = []
    watching = nats.credentials(client("watcher"), bucket)
    try:
        for i in range(watchers):
            conn = NatsConnection(nats.url, name=f"watcher-{i}", credentials=watching)
            await conn.connect()
            store = RegistryStore(conn, bucket)
            await store.open()
            index = LocalIndex(_trust(signing.cert_file))
            index.start(store, conn)
            await index.wait_synced(10)
            views.append((conn, index))
        writer_conn = NatsConnection(
            nats.url, name="writer", credentials=nats.credentials(agent("agent"), bucket)
        )
        await writer_conn.connect()
        writer = RegistryStore(writer_conn, bucket)
        await writer.open()
        writer.seal = signing.sealer()
        appear: list[float] = []
        vanish: list[float] = []
        for r in range(rounds):
            record = next(iter(_records(1, 1).values()))
            rec = AgentRecord.model_validate_json(_strict(record)).model_copy(
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
    result: dict[str, object] = {"watchers": watchers, "rounds": rounds}
    for label, values in (("registration", appear), ("deregistration", vanish)):
        values.sort()
        p50 = values[len(values) // 2] * 1000
        p99 = values[int(len(values) * 0.99)] * 1000
        result[label] = {"p50_ms": p50, "p99_ms": p99}
        verdict = "met" if p99 < 50 else "missed"
        print(
            f"S5  {label} seen by {watchers} watching sidecars, {rounds} rounds: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (goal p99 < 50 ms: {verdict})"
        )
    return result


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


async def s6(records: int) -> dict[str, object]:
    """A new sidecar's initial sync of ``records`` records: time to the full view, and its RSS."""
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-bench-s6-"))
    nats = BenchNats(workdir)
    nats.start()
    bucket = "bench_s6"
    try:
        conn = NatsConnection(
            nats.url, name="writer", credentials=nats.credentials(agent("agent"), bucket)
        )
        await conn.connect()
        store = RegistryStore(conn, bucket)
        await store.open()
        js = conn.client.jetstream()
        signing = _Signing(workdir)
        values = list(signing.signed(_records(records, capabilities=100)).items())
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
            str(signing.cert_file),
            stdout=subprocess.PIPE,
            env={**os.environ, **nats.env(client("s6"), bucket)},
        )
        out, _ = await asyncio.wait_for(child.communicate(), 120)
    finally:
        nats.stop()
    routable, viewed, verified, rss_mb, seen = (float(x) for x in out.decode().split())
    sync = "met" if routable < 2 else "missed"
    memory = "met" if rss_mb < 150 else "missed"
    print(
        f"S6  new sidecar, {int(seen)} records: initial sync (first call routable) "
        f"{routable:.2f} s (goal < 2 s: {sync}; the view alone {viewed:.2f} s); "
        f"every record verified {verified:.2f} s; peak RSS {rss_mb:.0f} MB "
        f"(goal < 150 MB: {memory})"
    )
    return {
        "records": int(seen),
        "new sidecar": {
            "sync_s": routable,
            "view_s": viewed,
            "all verified_s": verified,
            "peak_rss_mb": rss_mb,
        },
    }


def _route(index: LocalIndex, capability: str) -> None:
    """One call through the sidecar's resolve and balance layers, up to the chosen endpoint."""
    balance = BalanceLayer(_never, Endpoints(index))

    async def chosen(call: OutboundCall) -> Reply:
        return Reply(balance.choose(call))

    _drive(ResolveLayer(chosen, index), OutboundCall(capability, b"{}", deadline=0.0, timeout=1.0))


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


async def _s6_child(url: str, bucket: str, cert_file: str) -> None:
    """Run in a fresh process: connect, watch, wait for the full view and route one call
    (what that call uses verified); then wait until every record is verified. Print the
    times, the peak RSS and the records held."""
    started = time.perf_counter()
    credentials = nats_credentials(Settings(), None)  # the parent's .creds and CA, if secure
    conn = NatsConnection(url, name="s6-new-sidecar", credentials=credentials)
    await conn.connect()
    store = RegistryStore(conn, bucket)
    await store.open()
    index = LocalIndex(_trust(Path(cert_file)))
    index.start(store, conn)
    await index.wait_synced(60)
    viewed = time.perf_counter() - started
    _route(index, "cap0")
    routable = time.perf_counter() - started
    await index.wait_verified(120)
    verified = time.perf_counter() - started
    print(routable, viewed, verified, _peak_rss_mb(), len(index.records()))
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
        "--only",
        action="append",
        choices=("s4", "s5", "s6", "s7"),
        help="Run only this benchmark (repeatable); default: all.",
    )
    parser.add_argument(
        "--s6-child", nargs=3, metavar=("NATS_URL", "BUCKET", "CA"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.s6_child:
        asyncio.run(_s6_child(*args.s6_child))
        return 0
    only = set(args.only or ("s4", "s5", "s6", "s7"))
    if "s4" in only:
        s4(args.records, args.samples)
    if "s5" in only:
        asyncio.run(s5(args.watchers, args.rounds))
    if "s6" in only:
        asyncio.run(s6(args.records))
    if "s7" in only:
        asyncio.run(s7(args.starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
