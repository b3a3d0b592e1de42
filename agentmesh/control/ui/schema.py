"""Forms from a capability's JSON Schema: an example payload and a table of its fields."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["example_for", "schema_fields"]


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        ref: str = schema["$ref"]
        if ref.startswith("#/"):
            node: Any = root
            for part in ref[2:].split("/"):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            return node
    return schema


def example_for(schema: Any, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A payload that fits ``schema``: defaults and examples where given, else simple values."""
    root = root if root is not None else (schema if isinstance(schema, dict) else {})
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 6:
        return None
    if "default" in schema:
        return schema["default"]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            options = [s for s in schema[key] if _resolve(s, root).get("type") != "null"]
            if options:
                return example_for(options[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: example_for(v, root, depth + 1) for k, v in props.items()}
    return {
        "string": "",
        "integer": 0,
        "number": 0,
        "boolean": False,
        "array": [],
        "null": None,
    }.get(str(kind))


def _type_name(schema: Any, root: dict[str, Any]) -> str:
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("$ref"), str):
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(_type_name(s, root) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type_name(schema.get('items'), root)}"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    return str(kind) if kind else "any"


def schema_fields(schema: dict[str, Any]) -> list[dict[str, str]]:
    """The top-level properties of an object schema, as rows of a table."""
    body = _resolve(schema, schema)
    if not isinstance(body, dict):
        return []
    required = set(body.get("required", []))
    rows = []
    for name, prop in body.get("properties", {}).items():
        resolved = _resolve(prop, schema) if isinstance(prop, dict) else {}
        rows.append(
            {
                "name": name,
                "type": _type_name(prop, schema),
                "required": "yes" if name in required else "",
                "default": json.dumps(resolved.get("default")) if "default" in resolved else "",
                "description": str(resolved.get("description", "")),
            }
        )
    return rows
