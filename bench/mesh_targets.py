"""Mesh targets: calls through agentmesh, measured next to the baselines of ``baselines.py``.

* **M1** — ``Mesh.call`` from this process, through the client's full outbound stack (whatever
  ``agentmesh/sidecar/stack.py`` builds: observe, chain, resolve, deadline, retry, balance,
  breaker, ..., aiohttp transport), to one agent process
  started as a user would (``python -m agentmesh run bench/_echo_agent.py --port 0``), which
  serves an ``echo`` capability doing B1's work (see ``_echo_agent.py``). The registry is an
  embedded nats-server (``agentmesh.nats_server.NatsServer``) that the target starts; it is
  not on the request path (the client resolves from its watch-fed local index), so its share of
  the server CPU and RSS is printed apart under each table.
* **M2** — M1 with mutual TLS (certificates of a mesh CA the target creates).
* **M3** — M1 with every call sampled (100 % tracing) in the client and in the agent, spans
  exported by the SDK's ``BatchSpanProcessor`` over OTLP/HTTP to a local sink process (B0's raw
  echo server: it answers 200, which is all the exporter needs). M1 itself exports nothing: its
  client process installs no OpenTelemetry SDK (non-recording spans, no ``traceparent`` sent),
  and its agent samples 10 % of root spans with no exporter configured (agentmesh's defaults).

:class:`MeshCall` also serves ``bench/failover.py`` with several replicas and short leases.
Every agent starts from this process's environment without its ``AGENTMESH_*`` and ``OTEL_*``
variables, so that a developer's shell cannot change what a target measures.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic_core
from opentelemetry import trace

import agentmesh
from agentmesh.control.ca import write_root_ca
from agentmesh.mesh import Mesh
from agentmesh.nats_server import NatsServer
from agentmesh.settings import Settings

from .baselines import SERVERS
from .processes import ServerProcess, wait_until_ready
from .targets import ProcessTarget
from .workloads import make_payload

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "AGENT_FILE",
    "CAPABILITY",
    "AgentProcess",
    "MeshCall",
    "TracedMeshCall",
    "tracing_unavailable",
]

AGENT_FILE = Path(__file__).with_name("_echo_agent.py")
"""Executed by ``agentmesh run`` in the agent process."""
CAPABILITY = "echo"
AGENT_NAME = "bench-echo"
_READY_LINE = re.compile(r"(\S+) serving (\S+) at (https?://\S+)")
"""What ``agentmesh run`` prints on stdout once the agent is serving and registered."""
_PROBE = make_payload(256)
_START_TIMEOUT_S = 30.0
"""Generous: cold interpreters importing agentmesh (pydantic, uvicorn, nats) on busy cores."""


@dataclass(frozen=True, slots=True)
class AgentProcess:
    """One running agent: its process, and what it announced."""

    process: ServerProcess
    instance_id: str
    endpoint: str

    @property
    def pid(self) -> int:
        """The agent's pid."""
        return self.process.pid


class MeshCall(ProcessTarget):
    """M1: ``Mesh.call`` → in-process sidecar → agent process(es) serving ``echo``."""

    description = (
        "agentmesh Mesh.call (in-process sidecar: the whole outbound stack of "
        "agentmesh/sidecar/stack.py, its HTTP/1.1 keep-alive pool) → `agentmesh run` agent with "
        "its defaults (raw-ASGI inbound on uvicorn); the echo capability validates the payload "
        "into a pydantic model and returns an EchoBody pydantic model, B1's work"
    )

    def __init__(
        self,
        *,
        replicas: int = 1,
        agent_env: Mapping[str, str] | None = None,
        mtls: bool = False,
    ) -> None:
        super().__init__()
        self.mtls = mtls
        if mtls:
            self.description = self.description.replace(
                "HTTP/1.1 keep-alive pool",
                "HTTP/1.1 keep-alive pool, mutual TLS with certificates of a mesh CA",
            )
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self.agent_env = dict(agent_env or {})
        self.nats: NatsServer | None = None
        self.mesh: Mesh | None = None
        self.agents: list[AgentProcess] = []
        self._raw: bytes | None = None
        self._doc: Any = None

    async def start(self) -> None:
        """NATS, then the agents, then the client; return once a call through the mesh works."""
        self.nats = NatsServer(self.workdir / "nats")
        self.nats.start()  # blocks for the tens of ms nats-server needs; once per run
        url = self.nats.url
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTMESH_", "OTEL_"))}
        security: dict[str, str] = {"AGENTMESH_MTLS": "off"}
        if self.mtls:
            cert, key = write_root_ca(self.workdir / "ca", "agentmesh.local")
            security = {"AGENTMESH_CA_CERT_FILE": str(cert), "AGENTMESH_CA_KEY_FILE": str(key)}
        env.update(
            AGENTMESH_NATS_URL=url,
            AGENTMESH_DATA_DIR=str(self.workdir),
            PYTHONUNBUFFERED="1",
            **security,
            **self.agent_env,
        )
        procs = [self.spawn(f"agent-{i}", self.agent_argv(), env) for i in range(self.replicas)]
        lines = await asyncio.gather(*(p.read_line(_READY_LINE, _START_TIMEOUT_S) for p in procs))
        self.agents = [AgentProcess(p, m[1], m[3]) for p, m in zip(procs, lines, strict=True)]
        client: dict[str, Any] = {
            k.removeprefix("AGENTMESH_").lower(): v for k, v in security.items()
        }
        client.update(nats_url=url, data_dir=self.workdir)
        self.mesh = await agentmesh.connect(Settings.model_validate(client))
        await wait_until_ready(
            self._index_sees_every_agent, "M1 registry index", _START_TIMEOUT_S, self.processes
        )
        await wait_until_ready(
            lambda: self.call(_PROBE), "M1 agent via the mesh", _START_TIMEOUT_S, self.processes
        )
        self.facts.update(
            agent=f"agentmesh run, uvicorn asyncio/{_http_parser()}",
            replicas=str(self.replicas),
            nats=url,
        )

    def agent_argv(self) -> list[str]:
        """The command of one agent process (a subclass may serve ``echo`` another way)."""
        return [
            sys.executable,
            "-m",
            "agentmesh",
            "run",
            str(AGENT_FILE),
            "--name",
            AGENT_NAME,
            "--port",
            "0",
        ]

    async def _index_sees_every_agent(self) -> None:
        """Raise until the client's local index lists every agent as serving."""
        mesh = self.mesh
        assert mesh is not None
        serving = {
            t.instance_id
            for t in mesh.sidecar.index.targets(CAPABILITY)
            if t.record.status == "serving"
        }
        missing = [a.instance_id for a in self.agents if a.instance_id not in serving]
        if missing:
            await asyncio.sleep(0.02)
            raise LookupError(f"not in the client's index yet: {', '.join(missing)}")

    def _decoded(self, payload: bytes) -> Any:
        """The payload as a dict, decoded once per distinct bytes object (as a user holds it)."""
        if payload is not self._raw:
            self._doc = json.loads(payload)
            self._raw = payload
        return self._doc

    async def call(self, payload: bytes) -> bytes:
        """``Mesh.call`` with the payload as a dict; the decoded answer is re-encoded for the
        harness's echo check (pydantic_core.to_json: cheap, the same for every call)."""
        mesh = self.mesh
        assert mesh is not None, "M1 is not started"
        value = await mesh.call(CAPABILITY, self._decoded(payload))
        return pydantic_core.to_json(value)

    async def invoke(self, payload: bytes) -> agentmesh.CallResult:
        """``Mesh.invoke``: the answer plus which instance served it and after how many attempts."""
        mesh = self.mesh
        assert mesh is not None, "the mesh target is not started"
        return await mesh.invoke(CAPABILITY, self._decoded(payload))

    def server_pids(self) -> list[int]:
        """The agents and nats-server (the registry: off the request path, see offpath_pids)."""
        pids = [p.pid for p in self.processes if p._proc is not None]
        if self.nats is not None and self.nats.pid is not None:
            pids.append(self.nats.pid)
        return pids

    def offpath_pids(self) -> list[int]:
        """nats-server: the client resolves from its local index, so no call touches NATS."""
        if self.nats is not None and self.nats.pid is not None:
            return [self.nats.pid]
        return []

    async def close_client(self) -> None:
        """Close the client's sidecar (NATS connection, index watch, HTTP pool)."""
        if self.mesh is not None:
            mesh, self.mesh = self.mesh, None
            await mesh.close()

    def stop_shared(self) -> None:
        """NATS last: the agents deregister through it as they stop."""
        if self.nats is not None:
            self.nats.stop()


_TRACED: ContextVar[bool] = ContextVar("agentmesh_bench_traced", default=False)
"""True inside an M3 call: the only time the client's tracer records spans."""
_SINK_PORT = re.compile(r"PORT (\d+) ")
_NOOP_TRACER = trace.NoOpTracer()


def tracing_unavailable() -> str | None:
    """Why M3 cannot run in this environment (its exporter is an optional extra), or None."""
    try:
        found = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    return "M3 exports spans over OTLP/HTTP, which needs: pip install 'agentmesh[otlp]'"


class _PerCallTracer(trace.Tracer):
    """Delegates to the SDK's tracer inside M3's calls, to the no-op tracer elsewhere."""

    def __init__(self, provider: _PerCallTracerProvider, *args: Any) -> None:
        self._provider = provider
        self._args = args
        self._sdk: TracerProvider | None = None
        self._tracer: trace.Tracer = _NOOP_TRACER

    def _current(self) -> trace.Tracer:
        sdk = self._provider.sdk
        if sdk is None or not _TRACED.get():
            return _NOOP_TRACER
        if self._sdk is not sdk:
            self._sdk, self._tracer = sdk, sdk.get_tracer(*self._args)
        return self._tracer

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        """The SDK's span in an M3 call, else the no-op (invalid, non-recording) span."""
        return self._current().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`start_span`, as a context manager."""
        return self._current().start_as_current_span(*args, **kwargs)


class _PerCallTracerProvider(trace.TracerProvider):
    """This process's global tracer provider once M3 starts: SDK spans in M3's calls only.

    M1, M2 and M3 share this process and agentmesh's module-level tracer. M1 and M2 must keep
    what a process without the SDK does (non-recording spans, no ``traceparent`` sent, so their
    agent samples 10 % of root spans), while M3's calls are traced as with
    ``OTEL_TRACES_SAMPLER=always_on``. The switch costs M1 one context-variable read per span.
    """

    def __init__(self) -> None:
        self.sdk: TracerProvider | None = None

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        """A tracer that follows :attr:`sdk` and the M3 switch on every span."""
        return _PerCallTracer(
            self, instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )


@functools.cache
def _per_call_provider() -> _PerCallTracerProvider:
    """Install the per-call provider as the global one, once per process."""
    provider = _PerCallTracerProvider()
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        raise RuntimeError("M3: another OpenTelemetry tracer provider is already installed")
    return provider


class TracedMeshCall(MeshCall):
    """M3: M1 with every call sampled, in the client and in the agent, and every span exported."""

    description = (
        "M1 with every call sampled (100 % tracing): client and agent spans go through the SDK's "
        "BatchSpanProcessor and OTLP/HTTP exporter to a local sink (B0's raw echo server; "
        "off the request path)"
    )

    def __init__(self) -> None:
        super().__init__()
        self._sink: ServerProcess | None = None
        self._sdk: TracerProvider | None = None

    async def start(self) -> None:
        """The sink, then the client's SDK provider, then M1 with the agent sampling everything."""
        reason = tracing_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        self._sink = self.spawn("otlp-sink", [sys.executable, str(SERVERS), "asgi"])
        m = await self._sink.read_line(_SINK_PORT, _START_TIMEOUT_S)
        endpoint = f"http://127.0.0.1:{m[1]}"
        self.agent_env.update(
            OTEL_TRACES_SAMPLER="always_on",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        )
        sdk = TracerProvider(
            sampler=ALWAYS_ON, resource=Resource.create({"service.name": "bench-client"})
        )
        sdk.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{endpoint}/v1/traces")))
        _per_call_provider().sdk = self._sdk = sdk
        await super().start()
        self.facts.update(traces=f"always_on, BatchSpanProcessor, OTLP/HTTP to {endpoint}")

    async def call(self, payload: bytes) -> bytes:
        """M1's call with the client's spans recorded and exported."""
        token = _TRACED.set(True)
        try:
            return await super().call(payload)
        finally:
            _TRACED.reset(token)

    def offpath_pids(self) -> list[int]:
        """nats-server and the trace sink: neither is on the request path."""
        sink = [self._sink.pid] if self._sink is not None and self._sink._proc else []
        return super().offpath_pids() + sink

    async def close_client(self) -> None:
        """Close the client, then flush and stop the client's span export (the sink still runs)."""
        try:
            await super().close_client()
        finally:
            if self._sdk is not None:
                sdk, self._sdk = self._sdk, None
                _per_call_provider().sdk = None
                sdk.shutdown()


def _http_parser() -> str:
    """uvicorn's default HTTP parser in the agent: httptools when installed, else h11."""
    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
