"""``agentmesh check``: is the mesh sound? The dependencies, checked in the order they are
needed (control plane, NATS and its cluster, clocks, identities, mTLS), with what to do about the
first thing that is wrong."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import TypeAdapter
from rich.markup import escape

from agentmesh.cli._common import (
    ControlUrl,
    Output,
    OutputOpt,
    certificate_count,
    console,
    print_json,
    settings_from,
)
from agentmesh.errors import MeshError
from agentmesh.models import (
    AgentRecord,
    Bootstrap,
    JetStreamMeta,
)
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from agentmesh.registry.connection import NatsConnection

__all__ = ["check", "register"]

#: Clock skew with the control plane above this fails ``check``.
_MAX_SKEW = 1.0


def register(app: typer.Typer) -> None:
    app.command("check")(check)


@dataclass
class _Check:
    check: str
    ok: bool | None  # None: not checked (an earlier check failed) or not applicable
    detail: str
    hint: str | None = None


def check(
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
    nats_url: Annotated[
        str | None,
        typer.Option(
            help="NATS to check (env AGENTMESH_NATS_URL; default: ask the control plane)."
        ),
    ] = None,
) -> None:
    """Is the mesh sound? Control plane, NATS, JetStream, registry, clock skew, identities.

    One line per check, ✔ or ✖ with what to do; · marks a check that could not run. Exits 1
    if any check fails.
    """
    settings = settings_from(control_url=control_url, nats_url=nats_url)
    results = asyncio.run(_run_checks(settings))
    if output is Output.json:
        print_json([r.__dict__ for r in results])
    else:
        width = max(len(r.check) for r in results)
        for r in results:
            mark = "[green]✔[/]" if r.ok else "[red]✖[/]" if r.ok is False else "[dim]·[/]"
            console.print(f"{mark} {r.check:<{width}}  {escape(r.detail)}", highlight=False)
            if r.hint:
                console.print(f"  {'':<{width}}  → {escape(r.hint)}", highlight=False)
    if any(r.ok is False for r in results):
        raise typer.Exit(1)


async def _run_checks(settings: Settings) -> list[_Check]:
    import httpx

    from agentmesh.cli.nats_check import nats_meta
    from agentmesh.security.control_trust import admin_request

    results: list[_Check] = []
    control = settings.control_url.rstrip("/")
    health: dict[str, Any] | None = None
    boot: Bootstrap | None = None
    async with httpx.AsyncClient(timeout=3.0, **admin_request(settings)) as http:
        sent = time.time()
        try:
            resp = await http.get(f"{control}/healthz")
            received = time.time()
            resp.raise_for_status()
            health = resp.json()
            boot = Bootstrap.model_validate_json(
                (await http.get(f"{control}/v1/bootstrap")).content
            )
        except (httpx.HTTPError, ValueError) as exc:
            results.append(
                _Check(
                    "control plane",
                    False,
                    f"{control}: {_reason(exc)}",
                    "start it with `agentmesh control`, or point AGENTMESH_CONTROL_URL at it",
                )
            )
        else:
            note = "" if health.get("nats", True) else "; it has lost NATS too"
            detail = f"{control} answers (agentmesh {health.get('version')}{note})"
            results.append(_Check("control plane", True, detail))
        meta = await nats_meta(http, control if health else None, settings.nats_monitor_url)
        results.extend(await _nats_checks(settings, boot, health, meta))
        results.append(_clock_check(health, sent, received if health is not None else sent))
        results.append(await _identity_check(http, control, health is not None))
        results.append(await _mtls_check(http, control, health is not None))
    return results


async def _mtls_check(http: Any, control: str, reachable: bool) -> _Check:
    """Agents not in STRICT mode accept callers without a mesh certificate: say which."""
    if not reachable:
        return _Check("mTLS", None, "not checked: the control plane is unreachable")
    try:
        resp = await http.get(f"{control}/v1/agents")
        resp.raise_for_status()
        records = TypeAdapter(list[AgentRecord]).validate_json(resp.content)
    except Exception as exc:
        return _Check("mTLS", False, f"{control}/v1/agents: {_reason(exc)}")
    lax = sorted(f"{r.instance_id} ({r.mtls})" for r in records if r.mtls != "strict")
    if not records:
        return _Check("mTLS", None, "no agent instances to check")
    if not lax:
        return _Check("mTLS", True, f"all {len(records)} instance(s) strict")
    return _Check(
        "mTLS",
        None,
        f"{len(lax)} of {len(records)} instance(s) accept callers without a certificate: "
        + ", ".join(lax[:5])
        + (" …" if len(lax) > 5 else ""),
        "finish the migration, then run them with AGENTMESH_MTLS=strict (the default)",
    )


def _reason(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
                return "connection refused"
            cause = cause.__cause__ or cause.__context__
        return f"cannot connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer within 3s"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__


async def _nats_checks(
    settings: Settings,
    boot: Bootstrap | None,
    health: dict[str, Any] | None,
    meta: JetStreamMeta | None,
) -> list[_Check]:
    import nats.js.errors

    from agentmesh.cli.nats_check import cluster_checks, embedded_note, unreachable_hint
    from agentmesh.control.nats_status import mesh_buckets
    from agentmesh.security.nats_client import client_connection

    url = settings.nats_url or (boot.nats_url if boot is not None else None)
    bucket = boot.registry_bucket if boot is not None else settings.registry_bucket
    if url is None:
        return [
            _Check(
                "NATS",
                None,
                "not checked: its URL comes from the control plane, which is unreachable",
                None,
            ),
            _Check("JetStream", None, "not checked: NATS was not reached"),
            _Check("registry", None, "not checked: NATS was not reached"),
        ]
    try:
        conn = await client_connection(
            settings,
            url,
            bucket,
            name=f"agentmesh-check-{os.getpid()}",
            timeout=3.0,
            kv_replicas=settings.kv_replicas,
        )
    except MeshError as exc:
        return [
            _Check(
                "NATS",
                False,
                str(exc).removesuffix("; is nats-server running?"),
                unreachable_hint(health),
            ),
            _Check("JetStream", None, "not checked: NATS was not reached"),
            _Check("registry", None, "not checked: NATS was not reached"),
        ]
    results: list[_Check] = []
    try:
        nc = conn.client
        server = nc.connected_server_version
        version = f"{server.major}.{server.minor}.{server.patch}"
        detail = f"{url} reachable (nats-server {version}){embedded_note(health)}"
        results.append(_Check("NATS", True, detail))
        results.append(_nats_auth_check(conn))
        js = nc.jetstream()
        try:
            async with asyncio.timeout(3.0):
                info = await js.account_info()
        except Exception as exc:
            results.append(
                _Check(
                    "JetStream",
                    False,
                    f"not available on {url} ({type(exc).__name__})",
                    "start nats-server with -js (the registry is a JetStream KV bucket)",
                )
            )
            results.append(_Check("registry", None, "not checked: JetStream is off"))
            return results
        results.append(_Check("JetStream", True, f"enabled ({info.streams} stream(s))"))
        try:
            async with asyncio.timeout(3.0):
                kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            results.append(
                _Check(
                    "registry",
                    False,
                    f"bucket {bucket!r} not found on {url}",
                    "start `agentmesh control` or an agent on this NATS (they create it), or "
                    "check AGENTMESH_REGISTRY_BUCKET",
                )
            )
            return results
        try:
            async with asyncio.timeout(3.0):
                keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        hint = None if keys else "start one with `agentmesh run my_agent.py`"
        results.append(
            _Check("registry", True, f"bucket {bucket!r}: {len(keys)} agent instance(s)", hint)
        )
        for row in await cluster_checks(nc, mesh_buckets(bucket), conn.replicas(), meta):
            results.append(_Check(*row))
    except Exception as exc:  # NATS went away mid-check
        results.append(_Check("NATS", False, f"{url}: {exc or type(exc).__name__}"))
    finally:
        await conn.close()
    return results


def _nats_auth_check(conn: NatsConnection) -> _Check:
    if conn.unauthenticated:
        return _Check(
            "NATS auth",
            False,
            "OPEN: NATS accepts connections without credentials; anyone who can reach it can "
            "rewrite policies, revocations and registry records",
            "run NATS with the mesh's accounts (agentmesh nats-config, docs/security.md)",
        )
    tls = "TLS, " if conn.server_info.get("tls_required") else "no TLS, "
    return _Check("NATS auth", True, f"{tls}credentials required, permissions per subject")


def _clock_check(health: dict[str, Any] | None, sent: float, received: float) -> _Check:
    server_time = health.get("time") if health is not None else None
    if not isinstance(server_time, (int, float)):
        why = "the control plane is unreachable" if health is None else "it sends no time"
        return _Check("clock", None, f"skew not measured: {why}")
    skew = float(server_time) - (sent + received) / 2
    uncertainty = (received - sent) / 2
    detail = f"skew with the control plane {skew:+.3f}s (±{uncertainty:.3f}s)"
    if abs(skew) - uncertainty > _MAX_SKEW:
        return _Check(
            "clock",
            False,
            detail,
            "synchronise clocks (NTP/chrony): certificates and stats windows depend on them",
        )
    return _Check("clock", True, detail)


async def _identity_check(http: Any, control: str, reachable: bool) -> _Check:
    if not reachable:
        return _Check("identities", None, "not checked: the control plane is unreachable")
    try:
        resp = await http.get(f"{control}/v1/identities")
    except Exception as exc:
        return _Check("identities", False, f"{control}/v1/identities: {_reason(exc)}")
    if resp.status_code in (404, 405):
        return _Check(
            "identities", None, "not enabled yet (this control plane has no identity API)"
        )
    if resp.status_code in (401, 403):
        return _Check(
            "identities",
            False,
            f"HTTP {resp.status_code}",
            "set AGENTMESH_TOKEN to the admin token",
        )
    if resp.status_code != 200:
        return _Check("identities", False, f"{control}/v1/identities: HTTP {resp.status_code}")
    try:
        body = resp.json()
    except ValueError:
        return _Check("identities", False, "/v1/identities sent something that is not JSON")
    return _identities(body)


def _identities(body: Any) -> _Check:
    items = body if isinstance(body, list) else []
    if isinstance(body, dict):
        items = next((v for v in body.values() if isinstance(v, list)), [])
    now = datetime.now(UTC)
    expiries: list[tuple[datetime, str]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        name = next(
            (
                str(item[k])
                for k in ("name", "agent", "spiffe_id", "identity", "subject")
                if k in item
            ),
            "?",
        )
        raw = next(
            (item[k] for k in ("expires_at", "not_after", "expires", "expiry") if item.get(k)), None
        )
        if raw is None:
            continue
        try:
            at = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            continue
        expiries.append((at if at.tzinfo else at.replace(tzinfo=UTC), name))
    if not items:
        return _Check("identities", True, "enabled; no identities issued yet")
    counted = certificate_count(items)  # the words and numbers of `agentmesh identity list`
    if not expiries:
        return _Check("identities", True, f"{counted}; expiries not reported")
    expiries.sort()
    expired = [n for at, n in expiries if at <= now]
    if expired:
        return _Check(
            "identities",
            False,
            f"{len(expired)} expired: {', '.join(expired[:5])}",
            "restart those agents or check the control plane's certificate rotation",
        )
    listing = "; ".join(f"{n} in {_until(at - now)}" for at, n in expiries[:5])
    more = f" (+{len(expiries) - 5} more)" if len(expiries) > 5 else ""
    return _Check("identities", True, f"{counted}, next expiry: {listing}{more}")


def _until(delta: Any) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 60}m {seconds % 60}s"
