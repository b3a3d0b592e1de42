"""``agentmesh run FILE``: serve the capabilities of a Python file as an agent, with its sidecar."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from agentmesh.agent import Agent
from agentmesh.capability import is_capability
from agentmesh.cli._common import parse_labels, settings_from, setup_logging
from agentmesh.errors import ConfigurationError, MeshError
from agentmesh.telemetry.access import setup_access_log
from agentmesh.telemetry.tracing import setup_tracing


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def load_agent(path: Path, name: str | None = None) -> Agent:
    """The module's ``Agent`` if it defines one, else an agent of all its ``@capability``s."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigurationError(f"{path}: no such file")
    module_name = "agentmesh_user_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except MeshError:
        raise  # a @capability mistake: its message names the function and parameter already
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        where = Path(exc.filename).resolve() if exc.filename else path
        line = f", line {exc.lineno}" if exc.lineno else ""
        raise ConfigurationError(f"{where}{line}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigurationError(f"{_failing_line(path, exc)}: {_one_line(exc)}") from exc
    agents = [v for v in vars(module).values() if isinstance(v, Agent)]
    if len(agents) > 1:
        raise ConfigurationError(f"{path}: defines {len(agents)} Agent objects; keep one")
    if agents:
        agent = agents[0]
        if name:
            agent.name = name
            agent.instance_id = f"{name}-{agent.instance_id.rsplit('-', 1)[-1]}"
        return agent
    caps = [v for v in vars(module).values() if is_capability(v)]
    if not caps:
        raise ConfigurationError(
            f"{path}: no @capability functions and no Agent found; decorate a function with "
            "@agentmesh.capability"
        )
    return Agent(name or path.stem.lower().replace("_", "-"), capabilities=caps)


def _failing_line(path: Path, exc: BaseException) -> str:
    """``FILE, line N`` of the agent file's statement that failed (an import, a call).

    The deepest frame in the user's file is what they can change; frames below it are in the
    libraries it imported. A traceback of those is noise for "pip install X" or a typo.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f"{path}, line {frames[-1].lineno}" if frames else str(path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run(
    path: Annotated[Path, typer.Argument(help="Python file defining @capability functions.")],
    name: Annotated[str | None, typer.Option(help="Agent name (default: the file name).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one; it is registered).")] = 0,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Label key=value (repeatable).")
    ] = None,
    control_url: Annotated[
        str | None, typer.Option(help="Control plane URL (env AGENTMESH_CONTROL_URL).")
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option(help="NATS URL; skips the control plane (AGENTMESH_NATS_URL).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """Run an agent: serve its capabilities, register, heartbeat; SIGTERM drains and exits."""
    setup_logging(log_level)
    settings = settings_from(control_url=control_url, nats_url=nats_url)
    agent = load_agent(path, name)
    agent.labels.update(parse_labels(label))
    setup_tracing(agent.name)
    setup_access_log(settings.access_log)

    def ready(a: Agent) -> None:
        # typer's own styling, not rich: importing rich would delay the agent's first call.
        caps = ", ".join(a.capabilities)
        typer.echo(f"{typer.style(a.instance_id, bold=True)} serving {caps} at {a.endpoint}")

    asyncio.run(agent.serve(host=host, port=port, settings=settings, on_ready=ready))
