"""Tables read from the control plane's own ``/v1`` list endpoints, in-process (policies,
identities): a page says "none yet" until such an API exists."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from starlette.types import ASGIApp

__all__ = ["ApiListing", "api_listing", "policy_row"]


@dataclass(frozen=True, slots=True)
class ApiListing:
    """Rows of a control-plane API the dashboard shows generically (policies, identities)."""

    path: str
    available: bool  # False: the control plane has no such API yet
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    full: tuple[str, ...] = ()  # columns shown whole, as indented JSON


def _cell(value: Any, full: bool = False) -> str:
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif full:
        return json.dumps(value, default=str, indent=2, ensure_ascii=False)
    else:
        text = json.dumps(value, default=str, separators=(", ", ": "))
    return text if full or len(text) <= 160 else text[:157] + "…"


def policy_row(item: dict[str, Any]) -> dict[str, Any]:
    """A ``PolicyRevision`` as a row: name, kind, revision, time and the spec in full."""
    policy = item.get("policy") or {}
    return {
        "name": item.get("name"),
        "kind": policy.get("kind", ""),
        "revision": item.get("revision"),
        "updated": item.get("updated"),
        "spec": policy.get("spec") if policy else f"invalid: {item.get('error')}",
    }


async def api_listing(
    api: ASGIApp | None,
    request: Request,
    path: str,
    *,
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    full: tuple[str, ...] = (),
) -> ApiListing:
    """GET one of the control plane's own list endpoints in-process, as a table.

    The user's credentials (admin token header or cookie) go along. ``shape`` turns each item
    into the row shown (default: the item's own fields).
    """
    if api is None:
        return ApiListing(path, available=False)
    headers = {k: v for k, v in request.headers.items() if k in ("authorization", "cookie")}
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
        resp = await client.get(path, headers=headers)
    if resp.status_code in (404, 405) and "problem" not in resp.headers.get("content-type", ""):
        return ApiListing(path, available=False)  # no such route (yet)
    if resp.status_code != 200:
        return ApiListing(path, available=True, error=f"{path}: HTTP {resp.status_code}")
    data = resp.json()
    if isinstance(data, dict):
        data = data.get("items", [data])
    items = [d if isinstance(d, dict) else {"value": d} for d in data if d is not None]
    if shape is not None:
        items = [shape(item) for item in items]
    columns: list[str] = []
    for item in items:
        columns.extend(k for k in item if k not in columns)
    rows = [{c: _cell(item.get(c), c in full) for c in columns} for item in items]
    return ApiListing(path, available=True, columns=columns, rows=rows, full=full)
