"""What ``agentmesh check`` says about the NATS side: the embedded server's supervisor state, the
cluster's nodes and leaders, and each bucket's replicas (kept apart from ``observe.py``)."""

from __future__ import annotations

from typing import Any

__all__ = ["cluster_checks", "embedded_note", "unreachable_hint"]


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
    client: Any, buckets: list[str], want: int, monitor_urls: list[str]
) -> list[tuple[str, bool | None, str, str | None]]:
    """(check, ok, detail, hint) for the cluster's nodes and meta leader and each bucket's
    replicas and leader. The nodes are the servers the cluster advertises; the JetStream meta
    leader is only reported by the servers' monitoring endpoint (``/jsz``), read when
    ``AGENTMESH_NATS_MONITOR_URL`` names it."""
    import nats.js.errors

    from agentmesh.registry.cluster import advertised_servers, bucket_replicas

    servers = advertised_servers(client)
    meta = await _meta_cluster(monitor_urls)
    if meta is not None:
        # /jsz lists the answering server's peers; /varz adds the server itself.
        peers = sorted({str(meta["self"])} | {str(p.get("name")) for p in meta.get("replicas", [])})
        offline = [str(p.get("name")) for p in meta.get("replicas", []) if p.get("offline")]
        detail = (
            f"{meta.get('name')}: {len(peers)} JetStream node(s) {', '.join(peers)}; "
            f"meta leader {meta.get('leader')}"
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
            "set AGENTMESH_NATS_MONITOR_URL to their monitoring ports to see the meta leader",
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


async def _meta_cluster(monitor_urls: list[str]) -> dict[str, Any] | None:
    """``meta_cluster`` of the first monitoring endpoint that answers ``/jsz``, with ``self``:
    that server's name (from ``/varz``)."""
    import httpx

    async with httpx.AsyncClient(timeout=2.0) as http:
        for url in monitor_urls:
            try:
                meta = (await http.get(f"{url.rstrip('/')}/jsz")).json().get("meta_cluster")
                name = (await http.get(f"{url.rstrip('/')}/varz")).json().get("server_name")
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(meta, dict) and meta.get("leader") and name:
                return {**meta, "self": name}
    return None
