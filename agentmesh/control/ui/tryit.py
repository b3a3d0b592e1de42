"""The try-it form: a real call through the mesh from the control plane's sidecar, as any client
would make it, shown as the value (or a stream's chunks) or the failure's problem document."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from agentmesh.control.ui.render import pretty
from agentmesh.errors import InvalidInput, MeshError
from agentmesh.settings import Settings
from agentmesh.sidecar.sidecar import Sidecar

if TYPE_CHECKING:
    from agentmesh.mesh import Mesh

__all__ = ["TryIt", "TryResult"]

#: A streaming capability tried from the form shows at most this many chunks.
_MAX_TRY_CHUNKS = 200


@dataclass(frozen=True, slots=True)
class TryResult:
    """What the try-it form shows: a value (or the chunks of a stream) or a problem document."""

    capability: str
    ok: bool
    body: str  # pretty JSON: the value, or the problem document
    served_by: str = ""
    endpoint: str = ""
    elapsed_ms: float = 0.0
    attempts: int = 1
    status: int = 200
    chunks: int | None = None


class TryIt:
    """Calls made from the form, through one ``Mesh`` on the control plane's sidecar (made on
    first use: it needs the running loop)."""

    def __init__(self, sidecar: Sidecar, settings: Settings | None) -> None:
        self._sidecar = sidecar
        self._settings = settings
        self._mesh: Mesh | None = None

    async def __call__(
        self, request: Request, name: str, payload_text: str, timeout_text: str, version: str | None
    ) -> TryResult:
        from agentmesh.mesh import Mesh

        if self._mesh is None:
            self._mesh = Mesh(self._sidecar, self._settings or Settings(), owner=False)
        handle = self._mesh
        started = asyncio.get_running_loop().time()
        try:
            try:
                payload = json.loads(payload_text) if payload_text.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"the payload is not JSON: {exc}") from exc
            try:
                timeout = float(timeout_text) if timeout_text else None
            except ValueError as exc:
                raise InvalidInput(f"timeout {timeout_text!r} is not a number of seconds") from exc
            if timeout is not None and not 0 < timeout <= 300:
                raise InvalidInput("timeout must be between 0 and 300 seconds")
            targets = self._sidecar.index.targets(name)
            if targets and any(t.spec.streaming for t in targets):
                chunks = []
                async for chunk in handle.stream(name, payload, timeout=timeout, version=version):
                    chunks.append(chunk)
                    if len(chunks) >= _MAX_TRY_CHUNKS:
                        break
                elapsed = asyncio.get_running_loop().time() - started
                return TryResult(
                    name, True, pretty(chunks), elapsed_ms=elapsed * 1000, chunks=len(chunks)
                )
            out = await handle.invoke(name, payload, timeout=timeout, version=version)
        except MeshError as exc:
            elapsed = asyncio.get_running_loop().time() - started
            problem = exc.to_problem(instance=request.url.path)
            return TryResult(
                name,
                False,
                pretty(problem.model_dump(exclude_none=True)),
                elapsed_ms=elapsed * 1000,
                status=exc.status,
            )
        return TryResult(
            name,
            True,
            pretty(out.value),
            served_by=out.instance_id,
            endpoint=out.endpoint,
            elapsed_ms=out.elapsed * 1000,
            attempts=out.attempts,
        )
