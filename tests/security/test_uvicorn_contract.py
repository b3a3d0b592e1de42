"""The contract with uvicorn's private internals that ``agentmesh/inbound/tls.py`` and
``agentmesh/inbound/server.py`` rely on.

``MeshHttpProtocol`` subclasses ``HttpToolsProtocol`` (not public API) and ``HttpServer`` drives
``uvicorn.Server``'s state. pyproject pins uvicorn to the minor versions this was tested with; when
the pin is widened, these tests say exactly which name or signature a new release changed, before
an agent fails in production with an AttributeError in the middle of a handshake.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from agentmesh.inbound.server import HttpServer, bind
from agentmesh.inbound.tls import PEER_KEY, caller_identity
from tests.mesh_ca import mesh_ca

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
WHERE = "agentmesh/inbound/tls.py subclasses it"

#: What MeshHttpProtocol overrides or calls, with the parameters it passes (names and order).
PROTOCOL_METHODS = {
    "__init__": ["self", "config", "server_state", "app_state", "_loop"],
    "connection_made": ["self", "transport"],
    "data_received": ["self", "data"],
    "eof_received": ["self"],
    "connection_lost": ["self", "exc"],
    "on_message_begin": ["self"],
}


def _uvicorn_requirement() -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    [line] = [d for d in project["dependencies"] if re.match(r"uvicorn\b", d)]
    return Requirement(line)


def test_uvicorn_is_pinned_to_a_minor_range_that_includes_the_installed_one() -> None:
    requirement = _uvicorn_requirement()
    upper = [s for s in requirement.specifier if s.operator == "<"]
    assert upper, f"pyproject: {requirement} has no upper bound, but {WHERE}: pin it (<0.N)"
    installed = Version(uvicorn.__version__)
    assert requirement.specifier.contains(installed), (
        f"uvicorn {installed} is installed but pyproject pins {requirement}: run this file's "
        "tests with it, then move the pin"
    )


def test_the_protocol_class_and_the_methods_we_override_are_unchanged() -> None:
    assert issubclass(HttpToolsProtocol, asyncio.Protocol), f"HttpToolsProtocol: {WHERE}"
    for name, expected in PROTOCOL_METHODS.items():
        method = getattr(HttpToolsProtocol, name, None)
        assert callable(method), (
            f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.{name} is gone; {WHERE}"
        )
        got = list(inspect.signature(method).parameters)
        assert got == expected, (
            f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.{name}{tuple(got)} was "
            f"{tuple(expected)}; {WHERE}"
        )


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never called")


async def test_on_message_begin_builds_the_scope_the_app_receives() -> None:
    """MeshHttpProtocol adds the TLS extension to ``self.scope`` right after this call."""
    config = uvicorn.Config(app=_no_app, lifespan="off")
    config.load()
    protocol = HttpToolsProtocol(
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
    )
    protocol.on_message_begin()
    scope: Any = protocol.scope
    assert isinstance(scope, dict), f"HttpToolsProtocol.scope is {type(scope)}; {WHERE}"
    assert scope["type"] == "http"
    assert isinstance(protocol.loop, asyncio.AbstractEventLoop), f"HttpToolsProtocol.loop; {WHERE}"


def test_the_server_state_we_drive_is_unchanged() -> None:
    """``HttpServer`` replaces ``capture_signals`` and closes ``server_state.connections``."""
    assert inspect.isfunction(getattr(uvicorn.Server, "capture_signals", None)), (
        f"uvicorn {uvicorn.__version__}: Server.capture_signals is gone; agentmesh/inbound/server.py "
        "overrides it to keep signals for the agent's drain"
    )
    server = uvicorn.Server(uvicorn.Config(app=_no_app))
    for name in ("started", "should_exit", "force_exit", "server_state"):
        assert hasattr(server, name), (
            f"uvicorn.Server.{name} is gone; agentmesh/inbound/server.py uses it"
        )
    assert isinstance(server.server_state.connections, set), "ServerState.connections"


async def test_a_tls_request_reaches_the_app_with_the_callers_identity() -> None:
    """End to end on this uvicorn: the subclass handshakes, serves, and fills the scope."""
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        caller = caller_identity(scope)
        seen.append(str(caller.id) if caller else None)
        assert PEER_KEY in scope["extensions"]["tls"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    ca = mesh_ca()
    server = HttpServer(app, bind("127.0.0.1", 0), tls=ca.server_tls("contract"), graceful=1)
    await server.start()
    try:
        url = f"https://127.0.0.1:{server.port}/"
        async with httpx.AsyncClient(verify=ca.client_context("contract-test")) as http:
            # The server's certificate names an agent, not the host: the context skips the name.
            response = await http.get(url)
        assert response.status_code == 200
        assert response.text == "ok"
        assert seen == ["spiffe://agentmesh.local/client/contract-test"]
    finally:
        await server.stop()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "the server stopped"
