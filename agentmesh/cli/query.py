"""``agentmesh agents``, ``find`` and ``call``: look at the mesh and call through it."""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, overload

import typer
from pydantic import TypeAdapter
from rich.table import Table

import agentmesh.mesh
from agentmesh.cli._common import (
    ControlUrl,
    Output,
    OutputOpt,
    console,
    parse_labels,
    print_json,
    settings_from,
)
from agentmesh.errors import InvalidInput, RegistryUnavailable, error_from_problem
from agentmesh.models import AgentRecord, CapabilityOffer, EndpointHealth, Problem
from agentmesh.proxy import SIDECAR_LABEL
from agentmesh.settings import Settings


class ResultFormat(enum.StrEnum):
    json = "json"
    yaml = "yaml"


def register(app: typer.Typer) -> None:
    app.command("agents")(agents)
    app.command("find")(find)
    app.command("call")(call)


def _get(settings: Settings, path: str, params: dict[str, Any] | None = None) -> bytes:
    import httpx  # a cold path: kept off the import of every other command (agent start-up)

    from agentmesh.security.control_trust import admin_request, control_error

    url = f"{settings.control_url.rstrip('/')}{path}"
    try:
        resp = httpx.get(url, params=params, timeout=10.0, **admin_request(settings))
    except httpx.HTTPError as exc:
        raise control_error(exc, settings.control_url) from exc
    if resp.status_code != 200:
        try:
            problem = Problem.model_validate_json(resp.content)
        except ValueError:
            raise RegistryUnavailable(
                f"control plane at {settings.control_url}: HTTP {resp.status_code}"
            ) from None
        raise error_from_problem(problem, where=f"control plane at {settings.control_url}")
    return resp.content


def _health(settings: Settings) -> dict[str, EndpointHealth]:
    """Who ejects whom, as the sidecars reported it to the control plane."""
    items = TypeAdapter(list[EndpointHealth]).validate_json(_get(settings, "/v1/endpoints"))
    return {h.instance_id: h for h in items}


def _health_cell(status: str, health: EndpointHealth | None) -> str:
    cell = "[green]serving[/]" if status == "serving" else f"[yellow]{status}[/]"
    if health is not None and health.ejected_by:
        cell += f" [red]ejected by {len(health.ejected_by)}[/]"
    elif health is not None and health.probing_by:
        cell += " [yellow]probing[/]"
    return cell


def _with_health(item: AgentRecord | CapabilityOffer, health: EndpointHealth | None) -> Any:
    data = item.model_dump(mode="json")
    data["ejected_by"] = health.ejected_by if health else []
    data["probing_by"] = health.probing_by if health else []
    return data


@dataclass(frozen=True)
class _Find:
    capability: str | None
    version: str | None
    tags: list[str]
    labels: dict[str, str]


@overload
async def _from_nats(settings: Settings, query: None) -> list[AgentRecord]: ...
@overload
async def _from_nats(settings: Settings, query: _Find) -> list[CapabilityOffer]: ...
async def _from_nats(
    settings: Settings, query: _Find | None
) -> list[AgentRecord] | list[CapabilityOffer]:
    """Agents (``query`` None) or offers, read from AGENTMESH_NATS_URL's registry itself.

    With a NATS URL given, ``call`` never asks the control plane; a listing that did could show
    another mesh than the one its calls reach. Breaker health is the control plane's, so it is
    left out here.
    """
    async with agentmesh.mesh.connect(settings) as mesh:
        if query is None:
            return await mesh.registry.agents()
        return await mesh.registry.find(
            query.capability, version=query.version, tags=query.tags, labels=query.labels
        )


def _age(started: datetime) -> str:
    seconds = int((datetime.now(UTC) - started).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def agents(
    name: Annotated[str | None, typer.Option(help="Only instances of this agent.")] = None,
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """List live agent instances."""
    settings = settings_from(control_url=control_url)
    if settings.nats_url is not None:  # the mesh `call` uses too, not the control plane's
        records = [r for r in asyncio.run(_from_nats(settings, None)) if r.name == name or not name]
        health: dict[str, EndpointHealth] = {}
    else:
        body = _get(settings, "/v1/agents", {"name": name} if name else None)
        records = TypeAdapter(list[AgentRecord]).validate_json(body)
        health = _health(settings)
    if output is Output.json:
        print_json([_with_health(r, health.get(r.instance_id)) for r in records])
        return
    table = Table(title=f"{len(records)} agent instance(s)", title_justify="left")
    for column in ("INSTANCE", "AGENT", "VERSION", "ENDPOINT", "STATUS", "CAPABILITIES", "AGE"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.instance_id,
            r.name + (" (sidecar)" if r.labels.get(SIDECAR_LABEL) == "true" else ""),
            r.version,
            r.endpoint,
            _health_cell(r.status, health.get(r.instance_id)),
            ", ".join(c.name for c in r.capabilities),
            _age(r.started_at),
        )
    console.print(table)


def find(
    capability: Annotated[
        str | None, typer.Argument(help="Capability name (all if omitted).")
    ] = None,
    version: Annotated[str | None, typer.Option(help="PEP 440 specifier, e.g. '>=1.0'.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Required tag.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Required label key=value.")
    ] = None,
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Who offers a capability, where, and in what state."""
    settings = settings_from(control_url=control_url)
    params: dict[str, Any] = {"tag": tag or [], "label": label or []}
    if capability:
        params["name"] = capability
    if version:
        params["version"] = version
    labels = parse_labels(label)
    if settings.nats_url is not None:  # the mesh `call` uses too, not the control plane's
        query = _Find(capability, version, tag or [], labels)
        offers = asyncio.run(_from_nats(settings, query))
        health: dict[str, EndpointHealth] = {}
    else:
        offers = TypeAdapter(list[CapabilityOffer]).validate_json(
            _get(settings, "/v1/capabilities", params)
        )
        health = _health(settings)
    if output is Output.json:
        print_json([_with_health(o, health.get(o.instance_id)) for o in offers])
        return
    what = repr(capability) if capability else "any capability"
    table = Table(title=f"{len(offers)} offer(s) of {what}", title_justify="left")
    for column in ("CAPABILITY", "VERSION", "AGENT", "INSTANCE", "ENDPOINT", "STATUS", "TAGS"):
        table.add_column(column)
    for o in offers:
        table.add_row(
            o.capability.name + (" (stream)" if o.capability.streaming else ""),
            o.capability.version,
            o.agent,
            o.instance_id,
            o.endpoint,
            _health_cell(o.status, health.get(o.instance_id)),
            ", ".join(o.capability.tags),
        )
    console.print(table)


def call(
    capability: Annotated[str, typer.Argument(help="Capability to call.")],
    payload: Annotated[
        str, typer.Argument(help="JSON object of arguments; '-' reads it from stdin.")
    ] = "{}",
    timeout: Annotated[float | None, typer.Option(help="Total budget in seconds.")] = None,
    version: Annotated[str | None, typer.Option(help="PEP 440 specifier, e.g. '>=1.0'.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Required tag.")] = None,
    output: Annotated[
        ResultFormat, typer.Option("--output", "-o", help="json or yaml.")
    ] = ResultFormat.json,
    control_url: ControlUrl = None,
) -> None:
    """Call a capability through the mesh and print its result (streams print per chunk)."""
    settings = settings_from(control_url=control_url)
    text = sys.stdin.read() if payload == "-" else payload
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"payload is not JSON: {exc}") from exc
    asyncio.run(_call(settings, capability, arguments, timeout, version, tag, output))


def _print_result(value: Any, output: ResultFormat, *, chunk: bool) -> None:
    """A result as JSON (a stream: one compact line per chunk) or YAML (one document each)."""
    if output is ResultFormat.yaml:
        import yaml

        sys.stdout.write(
            yaml.safe_dump(value, sort_keys=False, allow_unicode=True, explicit_start=chunk)
        )
        sys.stdout.flush()
    elif chunk:
        print(json.dumps(value), flush=True)
    else:
        print(json.dumps(value, indent=2))


async def _call(
    settings: Settings,
    capability: str,
    arguments: Any,
    timeout: float | None,
    version: str | None,
    tags: list[str] | None,
    output: ResultFormat,
) -> None:
    async with agentmesh.mesh.connect(settings) as mesh:
        targets = mesh.sidecar.index.targets(capability)
        if targets and targets[0].spec.streaming:
            async for chunk in mesh.stream(
                capability, arguments, timeout=timeout, version=version, tags=tags
            ):
                _print_result(chunk, output, chunk=True)
            return
        result = await mesh.call(capability, arguments, timeout=timeout, version=version, tags=tags)
        _print_result(result, output, chunk=False)
