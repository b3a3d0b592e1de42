"""``agentmesh demo``: a whole mesh on this machine, an orchestration through it, then a clean stop.

Every part runs as its own process (embedded NATS, control plane, two researcher replicas and
three more agents), exactly as a user would run them, so the demo exercises the real thing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.table import Table

import agentmesh
from agentmesh._process import parent_death_hook
from agentmesh.cli._common import console
from agentmesh.errors import ConfigurationError, MeshUnavailable, PolicyDenied
from agentmesh.mesh import Mesh, connect
from agentmesh.settings import Settings

#: (file, replicas): the researcher runs twice to show calls spread over replicas.
_AGENTS = (("researcher.py", 2), ("summarizer.py", 1), ("planner.py", 1), ("writer.py", 1))
_STOP_TIMEOUT = 15.0


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def examples_dir() -> Path:
    """The example agents: shipped inside the wheel, or the repository's ``examples/``."""
    package = Path(agentmesh.__file__).parent
    for candidate in (package / "_examples", package.parent / "examples"):
        if (candidate / "agents" / "researcher.py").is_file():
            return candidate
    raise ConfigurationError(f"the example agents are missing (looked in {package})")


class _Process:
    """A child process whose output goes to a log file (never an undrained pipe)."""

    def __init__(self, label: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.label = label
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=parent_death_hook(),
            )

    def tail(self, lines: int = 8) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ConfigurationError(
                f"{self.label} exited with code {self.proc.returncode}:\n{self.tail()}"
            )

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> bool:
        """Wait for exit until ``deadline`` (monotonic); kill if it is late. True if clean."""
        try:
            self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            return self.proc.returncode == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the mesh running to explore; Ctrl-C stops it.")
    ] = False,
    topic: Annotated[str, typer.Option(help="What the orchestration researches.")] = (
        "a service mesh for agents"
    ),
) -> None:
    """Start the control plane (and its NATS) and example agents; run an orchestration; stop
    it all."""
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-demo-"))
    processes: list[_Process] = []
    ok = False
    try:
        console.rule("[bold]agentmesh demo")
        env = {**os.environ, "AGENTMESH_DATA_DIR": str(workdir)}
        for name in ("AGENTMESH_CONTROL_URL", "AGENTMESH_NATS_URL"):
            env.pop(name, None)
        control_url, nats_url = _start_control(workdir, env, processes)
        console.print(f"[green]✔[/] control plane at {control_url}  (API docs {control_url}/docs)")
        console.print(
            f"[green]✔[/] NATS (embedded, JetStream) at {nats_url}: TLS, and only enrolled "
            "workloads get in, each with its own permissions"
        )
        env["AGENTMESH_CONTROL_URL"] = control_url
        examples = examples_dir()
        expected = 0
        for filename, replicas in _AGENTS:
            for replica in range(replicas):
                stem = Path(filename).stem
                processes.append(
                    _Process(
                        f"agent {stem}#{replica + 1}",
                        [
                            sys.executable,
                            "-m",
                            "agentmesh",
                            "run",
                            str(examples / "agents" / filename),
                        ],
                        workdir / f"{stem}-{replica + 1}.log",
                        env,
                    )
                )
                expected += 1
        polyglot = _start_polyglot(examples, workdir, env, processes)
        expected += polyglot
        settings = Settings(control_url=control_url, nats_url=nats_url, data_dir=workdir)
        asyncio.run(
            _run(settings, examples, expected, processes, topic, keep, control_url, bool(polyglot))
        )
        ok = True
    finally:
        unclean = _stop_all(processes)
        if ok and not unclean:
            count = len(processes)
            console.print(f"[green]✔[/] stopped {count} processes cleanly; nothing left running")
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"logs kept in {workdir}")
    if unclean:
        raise MeshUnavailable(f"the demo worked, but {', '.join(unclean)} did not stop cleanly")


def _start_polyglot(
    examples: Path, workdir: Path, env: dict[str, str], processes: list[_Process]
) -> int:
    """The Node.js agent of examples/polyglot behind `agentmesh sidecar`, if node is installed.

    Returns how many agent instances it adds (0 or 1)."""
    node = shutil.which("node")
    app = examples / "polyglot" / "app.js"
    if node is None or not app.is_file():
        why = "`node` is not installed" if node is None else f"{app} is missing"
        console.print(f"[yellow]–[/] skipped the Node.js agent (examples/polyglot): {why}")
        return 0
    processes.append(
        _Process(
            "agent headliner (Node.js, agentmesh sidecar)",
            [
                sys.executable,
                "-m",
                "agentmesh",
                "sidecar",
                "--manifest",
                str(examples / "polyglot" / "agent.yaml"),
                "--app-health",
                "/healthz",
                "--egress-port",
                "0",
                "--",
                node,
                str(app),
            ],
            workdir / "headliner.log",
            env,
        )
    )
    return 1


def _start_control(
    workdir: Path, env: dict[str, str], processes: list[_Process]
) -> tuple[str, str]:
    """Start the control plane (with its embedded NATS); its URL and NATS's."""
    ready = workdir / "control.json"
    control = _Process(
        "control plane",
        [sys.executable, "-m", "agentmesh", "control", "--port", "0", "--ready-file", str(ready)],
        workdir / "control.log",
        env,
    )
    processes.append(control)
    deadline = time.monotonic() + 20
    while not ready.exists():
        control.check_alive()
        if time.monotonic() > deadline:
            raise MeshUnavailable(f"the control plane did not start within 20s:\n{control.tail()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    return str(info["control_url"]), str(info["nats_url"])


async def _run(
    settings: Settings,
    examples: Path,
    expected: int,
    processes: list[_Process],
    topic: str,
    keep: bool,
    control_url: str,
    polyglot: bool,
) -> None:
    async with connect(settings) as mesh:
        with console.status(f"waiting for {expected} agent instances to register…"):
            await _wait_for_agents(mesh, expected, processes)
        await _show_offers(mesh)
        orchestrate = _load(examples / "orchestrate.py")
        with console.status("running examples/orchestrate.py through the mesh…"):
            account: dict[str, Any] = await orchestrate.orchestrate(mesh, topic)
        _show_account(account)
        if polyglot:
            await _show_polyglot(mesh)
        await _show_zero_trust(mesh, settings, control_url)
        if keep:
            console.rule("[bold]the mesh keeps running")
            token_file = settings.data_dir / "admin-token"
            hint = f"  (sign in with the token in {token_file})" if token_file.exists() else ""
            console.print(f"  dashboard  {control_url}/ui{hint}")
            console.print(f"  export AGENTMESH_CONTROL_URL={control_url}")
            console.print(
                "  agentmesh agents    agentmesh find    "
                'agentmesh call research \'{"topic": "mesh"}\''
            )
            console.print("  Ctrl-C stops everything")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()


async def _show_polyglot(mesh: Mesh) -> None:
    """The Node.js agent: called like any agent, streaming, and calling Python back."""
    console.rule("[bold]any language: a Node.js agent behind `agentmesh sidecar`")
    [offer] = await mesh.registry.find("shout")
    shout = await mesh.call("shout", {"text": "hello from python"})
    console.print(
        f"[green]✔[/] shout (Node.js, {offer.instance_id} at {offer.endpoint}): "
        f"{shout['text']!r}; the app saw the caller as {shout['caller']}",
        highlight=False,
        soft_wrap=True,
    )
    counted = [chunk["n"] async for chunk in mesh.stream("countdown", {"start": 3})]
    console.print(f"[green]✔[/] countdown streamed through the sidecar: {counted}")
    text = (
        "Agents written in any language join the mesh through a sidecar. "
        "The sidecar checks every input against the manifest. Calls carry one trace."
    )
    headline = await mesh.call("headline", {"text": text, "max_words": 8})
    console.print(
        f"[green]✔[/] headline: Node.js called summarize (Python) through its egress: "
        f"{headline['headline']!r}",
        highlight=False,
        soft_wrap=True,
    )


async def _show_zero_trust(mesh: Mesh, settings: Settings, control_url: str) -> None:
    """mTLS identities, then an access policy applied live and enforced by every sidecar."""
    import httpx

    console.rule("[bold]zero trust")
    records = await mesh.registry.agents()
    names = sorted({r.identity or f"{r.name} (no identity)" for r in records})
    console.print(f"[green]✔[/] mTLS ({settings.mtls}): every call is mutually authenticated")
    for identity in names:
        console.print(f"    {identity}")
    td = settings.trust_domain
    policy = {
        "apiVersion": "agentmesh.dev/v1",
        "kind": "AccessPolicy",
        "metadata": {"name": "demo-guard", "description": "Clients may not summarize directly."},
        "spec": {
            "rules": [
                {
                    "name": "no-direct-summaries",
                    "action": "deny",
                    "sources": [{"spiffe": f"spiffe://{td}/client/*"}],
                    "targets": [{"capability": "summarize"}],
                }
            ]
        },
    }
    from agentmesh.security.control_trust import admin_request

    options = admin_request(settings.model_copy(update={"control_url": control_url}))
    async with httpx.AsyncClient(**options) as http:
        resp = await http.post(f"{control_url}/v1/policies", json=policy, timeout=10)
    if resp.status_code != 200:
        raise MeshUnavailable(f"applying the demo's access policy: HTTP {resp.status_code}")
    denied: PolicyDenied | None = None
    deadline = time.monotonic() + 5
    while denied is None and time.monotonic() < deadline:
        try:
            await mesh.call("summarize", {"text": "Policies apply within a second."})
            await asyncio.sleep(0.05)
        except PolicyDenied as exc:
            denied = exc
    if denied is None:
        raise MeshUnavailable("the demo's access policy did not take effect within 5 s")
    console.print("[green]✔[/] access policy 'demo-guard' applied live, enforced by every sidecar:")
    console.print(
        f"    client → summarize: [red]denied[/] ({denied})", highlight=False, soft_wrap=True
    )
    report = await mesh.invoke("plan", {"topic": "zero trust", "angles": ["reliability"]})
    console.print(
        f"    planner → summarize: [green]allowed[/] (plan served by {report.instance_id}, "
        f"{report.value['facts']} facts summarized)"
    )


async def _wait_for_agents(mesh: Mesh, expected: int, processes: list[_Process]) -> None:
    deadline = time.monotonic() + 30
    while len(await mesh.registry.agents()) < expected:
        for proc in processes:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise MeshUnavailable(
                f"only {len(await mesh.registry.agents())} of {expected} "
                "agents registered within 30s"
            )
        await asyncio.sleep(0.05)


async def _show_offers(mesh: Mesh) -> None:
    table = Table(title="who offers what", title_justify="left")
    for column in ("CAPABILITY", "VERSION", "INSTANCE", "ENDPOINT", "TAGS"):
        table.add_column(column)
    for offer in await mesh.registry.find():
        cap = offer.capability
        table.add_row(
            cap.name + (" (stream)" if cap.streaming else ""),
            cap.version,
            offer.instance_id,
            offer.endpoint,
            ", ".join(cap.tags),
        )
    console.print(table)


def _show_account(account: dict[str, Any]) -> None:
    console.print(
        "[bold]registry.find('summarize', tags=['en'], version='>=1.0')[/]:",
        ", ".join(account["summarize_offers"]),
    )
    table = Table(title="research calls (balanced over replicas)", title_justify="left")
    table.add_column("SERVED BY")
    table.add_column("ANGLE")
    table.add_column("FACTS", justify="right")
    for instance, angle, facts in account["research"]:
        table.add_row(instance, angle, str(facts))
    console.print(table)
    plan = account["plan"]
    steps = Table(
        title=f"plan({plan['topic']!r}) served by {plan['served_by']}", title_justify="left"
    )
    steps.add_column("STEP")
    steps.add_column("SERVED BY")
    steps.add_column("DETAIL")
    for step in plan["steps"]:
        steps.add_row(step["capability"], step["served_by"], step["detail"])
    console.print(steps)
    console.print(f"[bold]summary[/]: {plan['summary']}")
    console.print("[bold]stream('draft')[/]:")
    for text in account["draft"]:
        console.print(f"  • {text}")
    console.print(f"[bold]headline[/]: {account['headline']}")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("agentmesh_demo_orchestrate", path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"{path}: cannot load")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stop_all(processes: list[_Process]) -> list[str]:
    """Agents first (they drain and deregister), then the control plane (and its NATS).

    Returns the labels of processes that had to be killed or exited with an error.
    """
    agents = [p for p in processes if p.label.startswith("agent")]
    others = [p for p in processes if not p.label.startswith("agent")]
    unclean: list[str] = []
    for group in (agents, others):
        for proc in group:
            proc.terminate()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for proc in group:
            if not proc.wait(deadline):
                console.print(f"[yellow]![/] {proc.label} did not stop cleanly; see {proc.log}")
                unclean.append(proc.label)
    return unclean
