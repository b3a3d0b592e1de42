"""Targets of S8: the out-of-process hop of ``agentmesh sidecar``, and the httpx face.

* **M4** — ``Mesh.call`` → the standalone sidecar (``python -m agentmesh sidecar --app URL``:
  the mesh port with the same inbound as M1's agent, JSON Schema checks of input and output)
  → over loopback to an app process: B0's raw ASGI echo server on uvicorn, so the app adds as
  little as an HTTP server can. Everything else (client, NATS, mTLS off) is M1's.
* **M5** — M1 called through the httpx face: ``await mesh.http.post("/v1/invoke/echo",
  json=...)`` and ``response.json()`` instead of ``Mesh.call``; the agent is M1's.

S8 compares both with M1 in the same run: what the sidecar hop adds to p50 and what it costs in
throughput at 32 in flight, and what httpx's request and response objects add.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pydantic_core

from .baselines import SERVERS
from .mesh_targets import AGENT_NAME, CAPABILITY, MeshCall

__all__ = ["HttpxMeshCall", "SidecarMeshCall"]

_PORT_LINE = re.compile(r"PORT (\d+) ")
_START_TIMEOUT_S = 30.0

#: The echo capability's fields (``bench.workloads.make_payload``) as the JSON Schema the app's
#: manifest declares: the same checks M1's pydantic model makes.
_ECHO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "agent": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "params": {"type": "object", "additionalProperties": {"type": "number"}},
        "text": {"type": "string"},
    },
    "required": ["id", "agent", "tags", "params", "text"],
    "additionalProperties": False,
}


class SidecarMeshCall(MeshCall):
    """M4: ``Mesh.call`` → ``agentmesh sidecar`` → the app (a raw echo server) on loopback."""

    description = (
        "M1's client → `agentmesh sidecar --app` (the standalone sidecar: M1's inbound, input and "
        "output checked against the manifest's JSON Schemas) → loopback HTTP/1.1 keep-alive → "
        "the app: B0's raw ASGI echo server on uvicorn"
    )

    def __init__(self) -> None:
        super().__init__()
        self._app_url = ""

    async def start(self) -> None:
        """The app, then M1's start with the sidecar as the agent process."""
        app = self.spawn("app", [sys.executable, str(SERVERS), "asgi"])
        m = await app.read_line(_PORT_LINE, _START_TIMEOUT_S)
        self._app_url = f"http://127.0.0.1:{m[1]}"
        manifest = {
            "apiVersion": "agentmesh.dev/v1",
            "kind": "Agent",
            "metadata": {"name": AGENT_NAME},
            "spec": {
                "capabilities": [
                    {
                        "name": CAPABILITY,
                        "idempotent": True,
                        "path": "/echo",
                        "input": _ECHO_SCHEMA,
                        "output": _ECHO_SCHEMA,
                    }
                ]
            },
        }
        (self.workdir / "agent.yaml").write_text(json.dumps(manifest))  # JSON is YAML
        await super().start()
        self.facts.update(app=f"uvicorn raw ASGI echo at {self._app_url}")

    def agent_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agentmesh",
            "sidecar",
            "--manifest",
            str(self.workdir / "agent.yaml"),
            "--app",
            self._app_url,
            "--port",
            "0",
            "--egress-port",
            "0",
        ]


class HttpxMeshCall(MeshCall):
    """M5: M1 through the httpx face (``mesh.http``)."""

    description = (
        "M1 called through the httpx face: mesh.http.post('/v1/invoke/echo', json=...) then "
        "response.json() (httpx request/response objects on Mesh.transport(), no httpcore)"
    )

    async def call(self, payload: bytes) -> bytes:
        mesh = self.mesh
        assert mesh is not None, "M5 is not started"
        response = await mesh.http.post(f"/v1/invoke/{CAPABILITY}", json=self._decoded(payload))
        if response.status_code != 200:
            raise RuntimeError(f"M5: HTTP {response.status_code}: {response.text[:200]}")
        return pydantic_core.to_json(response.json())
