"""What ``agentmesh check`` says about the NATS side: the embedded server's supervisor state, the
cluster's nodes and leaders, and each bucket's replicas (kept apart from ``check.py``)."""

from __future__ import annotations

from typing import Any

from agentmesh.models import JetStreamMeta

__all__ = ["cluster_checks", "embedded_note", "nats_meta", "unreachable_hint"]

_META_TIMEOUT = 6.0
"""Seconds ``check`` waits for the control plane's answer about the meta group: it connects
to NATS for it and waits for a server, 2 s each (control/nats_status.py), plus slack."""


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


async def cluster_checks(
    client: Any, buckets: list[str], want: int, meta: JetStreamMeta | None
) -> list[tuple[str, bool | None, str, str | None]]:
    """(check, ok, detail, hint) for the cluster's nodes and meta leader and each bucket's
    replicas and leader. The nodes are the servers the cluster advertises; the JetStream meta
    leader is what :func:`nats_meta` found."""
    import nats.js.errors

    from agentmesh.registry.cluster import advertised_servers, bucket_replicas

    servers = advertised_servers(client)
    if meta is not None:
        # A server reports its peers; the server itself is the one that answered.
        peers = sorted({meta.server} | {p.name for p in meta.peers})
        offline = [p.name for p in meta.peers if p.offline]
        detail = (
            f"{meta.cluster}: {len(peers)} JetStream node(s) {', '.join(peers)}; "
            f"meta leader {meta.leader}"
        )
        if offline:
            detail += f"; offline: {', '.join(offline)}"
        nodes: tuple[str, bool | None, str, str | None] = (
            "NATS cluster",
            not offline,
            detail,
            "bring the offline node(s) back: each is one of the quorum" if offline else None,
        )
    elif len(servers) > 1:
        nodes = (
            "NATS cluster",
            True,
            f"{len(servers)} node(s) advertised: {', '.join(servers)}",
            "the meta leader is asked of NATS by the control plane (as the system account, on a "
            "NATS with the mesh's accounts) or read from AGENTMESH_NATS_MONITOR_URL: neither "
            "answered",
        )
    else:
        nodes = ("NATS cluster", None, f"a single server ({servers[0] if servers else '?'})", None)
    results = [nodes]
    lines: list[str] = []
    short: list[str] = []
    for bucket in buckets:
        try:
            info = await bucket_replicas(client, bucket)
        except nats.js.errors.NotFoundError:
            lines.append(f"{bucket}: not created yet")
            continue
        except Exception as exc:  # no leader to answer, NATS gone mid-check
            lines.append(f"{bucket}: no answer ({type(exc).__name__})")
            short.append(bucket)
            continue
        leader = info.leader or "none elected"
        behind = [name for name, current in info.peers if not current]
        line = f"{bucket}: R{info.replicas}, leader {leader}"
        if behind:
            line += f" ({', '.join(behind)} behind)"
        lines.append(line)
        if info.replicas < want or not info.leader:
            short.append(bucket)
    hint = None
    if short:
        hint = (
            f"every bucket should have {want} replica(s) and a leader; the control plane raises "
            "replicas at start and on reconnect (AGENTMESH_KV_REPLICAS)"
        )
    results.append(("buckets", not short, "; ".join(lines), hint))
    return results


async def nats_meta(
    http: Any, control: str | None, monitor_url: str | None
) -> JetStreamMeta | None:
    """The JetStream meta group: from the servers' monitoring endpoints when
    ``AGENTMESH_NATS_MONITOR_URL`` names them, else from the control plane (``control``: its URL
    if it answered), which asks NATS as the system account."""
    import httpx
    from pydantic import TypeAdapter, ValidationError

    monitors = [u.strip().rstrip("/") for u in (monitor_url or "").split(",") if u.strip()]
    if monitors:
        return await _monitored_meta(http, monitors)
    if control is None:
        return None
    try:
        # The control plane connects to NATS for it (2 s) and waits for a server (2 s).
        resp = await http.get(f"{control}/v1/nats/meta", timeout=_META_TIMEOUT)
        resp.raise_for_status()
        meta: JetStreamMeta | None = TypeAdapter(JetStreamMeta | None).validate_json(resp.content)
    except (httpx.HTTPError, ValidationError):  # an older control plane, or none
        return None
    return meta


async def _monitored_meta(http: Any, monitors: list[str]) -> JetStreamMeta | None:
    """The first monitoring endpoint whose ``/jsz`` names a leader (``/varz``: its name)."""
    import httpx

    from agentmesh.control.nats_status import meta_from_jsz

    for url in monitors:
        try:
            jsz = (await http.get(f"{url}/jsz")).json()
            name = (await http.get(f"{url}/varz")).json().get("server_name")
        except (httpx.HTTPError, ValueError, AttributeError):
            continue
        meta = meta_from_jsz(jsz, str(name)) if isinstance(jsz, dict) and name else None
        if meta is not None:
            return meta
    return None
