"""What an agent's start-up imports (goal S7): heavy modules stay off the ``agentmesh run`` path.

Timings are for ``bench/registry.py`` (S7); these tests pin the causes instead: which modules a
fresh process has loaded once it could serve an agent, and that what was left out still works
when it is needed. Each check runs in a fresh interpreter, since this one has imported anything.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _fresh(code: str) -> object:
    """Run ``code`` in a new interpreter; it prints one JSON value, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(done.stdout)


#: Each only for what an agent with mTLS off never does on its way to serving: aiohttp (NATS over
#: WebSocket; not a dependency, but the bench and dev extras install it), httpx (asking the
#: control plane), cryptography (mTLS), the control plane's web stack, YAML manifests, the
#: tracing SDK (only with an exporter or a sampler configured), rich (the other commands' tables).
_NOT_ON_THE_START_PATH = [
    "aiohttp",
    "cryptography",
    "fastapi",
    "httpx",
    "jinja2",
    "starlette",
    "yaml",
    "opentelemetry.sdk",
    "rich",
]


def test_agent_start_path_leaves_heavy_imports_out():
    loaded = _fresh(
        "import json, sys\n"
        "import agentmesh.cli.run, agentmesh.agent\n"
        f"print(json.dumps([m for m in {_NOT_ON_THE_START_PATH!r} if m in sys.modules]))"
    )
    assert loaded == []


def test_running_a_command_builds_that_command_only():
    """``agentmesh run`` looks its command up in the CLI's group: that imports ``run``'s module
    and no other command's (nor rich, which only they and help pages use)."""
    loaded = _fresh(
        "import json, sys\n"
        "import typer.main\n"
        "from agentmesh.cli import app\n"
        "group = typer.main.get_command(app)\n"
        "ctx = group.make_context('agentmesh', ['run', 'agent.py'])\n"
        "name, command, args = group.resolve_command(ctx, ['run', 'agent.py'])\n"
        "print(json.dumps([name, command.name, args, sorted(\n"
        "    m for m in sys.modules if m.startswith(('agentmesh.cli', 'rich')))]))"
    )
    assert loaded == [
        "run",
        "run",
        ["agent.py"],
        ["agentmesh.cli", "agentmesh.cli._common", "agentmesh.cli.run"],
    ]


def test_import_agentmesh_is_lazy_but_complete():
    loaded = _fresh(
        "import json, sys\n"
        "import agentmesh\n"
        "before = 'agentmesh.agent' in sys.modules\n"
        "from agentmesh import Agent, capability, connect\n"
        "import agentmesh.capability\n"
        "print(json.dumps([before, callable(agentmesh.capability), Agent.__module__]))"
    )
    assert loaded == [False, True, "agentmesh.agent"]


def test_the_control_plane_clients_import_httpx_only_when_they_ask():
    """Bootstrap and enrolment speak HTTPS with httpx, the one HTTP client of the cold paths,
    imported when a request is made: a sidecar with its own CA never loads it."""
    loaded = _fresh(
        "import json, sys\n"
        "import agentmesh.sidecar.bootstrap, agentmesh.security.enrol\n"
        "import agentmesh.security.control_trust, agentmesh.security.workload\n"
        "print(json.dumps([m for m in ('httpx', 'aiohttp') if m in sys.modules]))"
    )
    assert loaded == []


def test_nats_websocket_transport_still_gets_aiohttp():
    """nats-py is imported without aiohttp (agentmesh/_nats.py); its WebSocket transport
    reaches the real module on first use, and nobody else sees the stand-in."""
    result = _fresh(
        "import json, sys\n"
        "import agentmesh\n"
        "import nats.aio.transport as transport\n"
        "before = 'aiohttp' in sys.modules\n"
        "session = transport.aiohttp.ClientSession\n"
        "import aiohttp\n"
        "print(json.dumps([before, session is aiohttp.ClientSession,\n"
        "                  type(aiohttp).__name__, bool(transport.aiohttp),\n"
        "                  vars(transport.aiohttp).get('WSMsgType') is aiohttp.WSMsgType]))"
    )
    assert result == [False, True, "module", True, True]
