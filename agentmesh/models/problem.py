"""The error document every API and agent answers with (RFC 9457)."""

from __future__ import annotations

from typing import Any

from agentmesh.models._base import Wire

__all__ = ["Problem"]


class Problem(Wire):
    """An RFC 9457 problem document; ``code`` is the stable field callers act on."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    retry_after: float | None = None
    trace_id: str | None = None
