"""pydantic's validation errors, bounded: what a 422 answer lists, whatever the request held.

A body of 8 MiB may hold 700,000 unknown keys, so 700,000 errors: turning all of them into
Python dicts (``ValidationError.errors()``) and JSON held an agent's event loop for seconds and
answered tens of megabytes. Here only the first ``limit`` are decoded — from pydantic's own JSON
rendering, made in Rust without the input — and the rest are counted. The input is never
included: a request body is never echoed back.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

__all__ = ["DEFAULT_MAX_ERRORS", "error_items"]

#: Errors listed in a 422 unless told otherwise (``AGENTMESH_MAX_ERROR_ITEMS`` defaults to it).
DEFAULT_MAX_ERRORS = 20
_DECODER = json.JSONDecoder()


def error_items(exc: ValidationError, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` errors as ``{type, loc, msg}``; one more entry counts the rest."""
    count = exc.error_count()
    if count <= limit:
        items: list[Any] = exc.errors(include_url=False, include_input=False, include_context=False)
    else:
        text = exc.json(include_url=False, include_input=False, include_context=False)
        items, at = [], 1  # past the "["
        for _ in range(limit):
            item, at = _DECODER.raw_decode(text, at)
            items.append(item)
            at += 1  # past the ","
    out = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in items]
    if count > limit:
        out.append(
            {
                "type": "too_many_errors",
                "loc": [],
                "msg": f"{count - limit} more error(s) not listed",
            }
        )
    return out
