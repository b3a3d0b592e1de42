"""What a real ``agentmesh run`` process has imported by the time it answers its first call.

Goal S7 (an agent's start to its first call) is mostly import time (docs/benchmarks.md);
timing belongs to ``bench/``. This pins the cause instead: the agent's one capability answers
its first call with the names of the modules its process has loaded, and they must not include
what only other commands, the control plane or a configured trace exporter need.
"""

from __future__ import annotations

from pathlib import Path

from agentmesh import Mesh

from .support import SpawnAgent

AGENT = '''"""An agent that says what its process has imported."""
import sys

from agentmesh import capability


@capability
async def loaded_modules() -> list[str]:
    return sorted(sys.modules)
'''

#: Modules (and their submodules) an agent never needs to start and answer: rich (the other
#: commands' tables and help pages), the control plane's server and its web stack (its CA is
#: used: these agents issue their certificates from a local CA), the control plane's HTTP client,
#: YAML manifests, aiohttp (NATS over WebSocket), the tracing SDK (no exporter and no sampler
#: configured here).
NEVER = (
    "rich",
    "agentmesh.control.app",
    "agentmesh.control.server",
    "fastapi",
    "starlette",
    "jinja2",
    "httpx",
    "yaml",
    "aiohttp",
    "opentelemetry.sdk",
    "websockets",
)

NO_TRACING_CONFIGURED = dict.fromkeys(
    (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
    )
)


async def test_an_agent_answers_its_first_call_without_the_other_commands_imports(
    mesh: Mesh, spawn_agent: SpawnAgent, tmp_path: Path
) -> None:
    file = tmp_path / "start_probe.py"
    file.write_text(AGENT)
    # As if websockets were installed (uvicorn[standard] installs it): an importable package.
    installed = tmp_path / "site-packages"
    (installed / "websockets").mkdir(parents=True)
    (installed / "websockets" / "__init__.py").write_text('"""Not the real one."""\n')
    await spawn_agent(file, env={"PYTHONPATH": str(installed), **NO_TRACING_CONFIGURED})
    loaded = await mesh.call("loaded_modules", {}, retries=0)
    assert {"agentmesh.agent", "agentmesh.cli.run", "uvicorn"} <= set(loaded)
    assert [m for m in loaded if any(m == n or m.startswith(f"{n}.") for n in NEVER)] == []
    commands = [m for m in loaded if m.startswith("agentmesh.cli.")]
    assert commands == ["agentmesh.cli._common", "agentmesh.cli.run"]
