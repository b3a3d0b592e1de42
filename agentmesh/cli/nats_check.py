"""What ``agentmesh check`` says about the NATS side: the embedded server's supervisor state, the
cluster's nodes and leaders, and each bucket's replicas (kept apart from ``observe.py``)."""

from __future__ import annotations

from typing import Any

__all__ = ["embedded_note", "unreachable_hint"]


def _embedded(health: dict[str, Any] | None) -> dict[str, Any] | None:
    server = (health or {}).get("nats_server")
    if isinstance(server, dict) and server.get("mode") == "embedded":
        return server
    return None


def embedded_note(health: dict[str, Any] | None) -> str:
    """`` (embedded, running, restarted 1 time)`` when the control plane runs NATS itself."""
    server = _embedded(health)
    if server is None:
        return ""
    restarts = int(server.get("restarts") or 0)
    note = f"embedded, {server.get('state')}"
    if restarts:
        note += f", restarted {restarts} time{'s' if restarts > 1 else ''}"
        note += f" (last: {server.get('last_exit')})"
    return f" ({note})"


def unreachable_hint(health: dict[str, Any] | None) -> str:
    """What to do when NATS does not answer, knowing what the control plane says of it."""
    server = _embedded(health)
    if server is None:
        if health is not None:
            return (
                "start nats-server at that address (the control plane uses it and runs no "
                "embedded one), or fix AGENTMESH_NATS_URL"
            )
        return (
            "start nats-server (`agentmesh control` runs an embedded one), or fix "
            "AGENTMESH_NATS_URL"
        )
    state = server.get("state")
    if state == "failed":
        return (
            f"the control plane's embedded nats-server has failed ({server.get('last_exit')}) "
            "and is no longer restarted: see nats-server.log in its data dir, then restart "
            "`agentmesh control`"
        )
    return f"the control plane's embedded nats-server is {state}: wait a few seconds and retry"
