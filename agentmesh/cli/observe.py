"""``agentmesh stat``, ``top``, ``tap`` and ``check``: see every call; is the mesh sound?

``stat`` and ``top`` read ``GET /v1/stats`` of the control plane (golden metrics merged from
every sidecar's reports); ``tap`` talks to the sidecars over NATS directly (they publish a
tapped capability's calls only while a tap is running); ``check`` walks the dependencies in the
order they are needed and says what to do about the first thing that is wrong.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ConfigDict, TypeAdapter, ValidationError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agentmesh.cli._common import (
    Output,
    certificate_count,
    console,
    err_console,
    print_json,
    settings_from,
)
from agentmesh.cli.query import _get
from agentmesh.errors import MeshError
from agentmesh.models import (
    AgentRecord,
    Bootstrap,
    JetStreamMeta,
    StatRow,
    TapAck,
    TapEvent,
    TapRequest,
)
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from agentmesh.registry.connection import NatsConnection

ControlUrl = Annotated[
    str | None, typer.Option(help="Control plane URL (env AGENTMESH_CONTROL_URL).")
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json.")]

#: How often ``tap`` re-announces itself, and how long sidecars keep tapping without news.
_TAP_ANNOUNCE = 1.0
_TAP_TTL = 3.0
#: Clock skew with the control plane above this fails ``check``.
_MAX_SKEW = 1.0


class StatGroupArg(enum.StrEnum):
    agents = "agents"
    capabilities = "capabilities"
    edges = "edges"


def register(app: typer.Typer) -> None:
    app.command("stat")(stat)
    app.command("top")(top)
    app.command("tap")(tap)
    app.command("check")(check)


# --------------------------------------------------------------------------------------
# stat / top
# --------------------------------------------------------------------------------------

#: Built on first use (defer_build), not when every other command starts.
_ROWS = TypeAdapter(list[StatRow], config=ConfigDict(defer_build=True))


def _stats(settings: Settings, group: str, window: float) -> list[StatRow]:
    return _ROWS.validate_json(_get(settings, "/v1/stats", {"group": group, "window": window}))


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    if value >= 100:
        return f"{value:.0f}ms"
    if value >= 10:
        return f"{value:.1f}ms"
    return f"{value:.2f}ms"


def _success(rate: float | None) -> str:
    if rate is None:
        return "-"
    colour = "green" if rate >= 0.99 else "yellow" if rate >= 0.9 else "red"
    return f"[{colour}]{rate * 100:.2f}%[/]"


def _rps(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _stat_table(rows: list[StatRow], title: str, first: str = "NAME") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for column in ("REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            escape(r.name),
            str(r.requests),
            _rps(r.rps),
            _success(r.success_rate),
            _ms(r.p50_ms),
            _ms(r.p95_ms),
            _ms(r.p99_ms),
        )
    return table


def stat(
    group: Annotated[
        StatGroupArg,
        typer.Argument(
            help="agents: what each agent served; capabilities: what callers asked for; "
            "edges: calls per caller -> callee."
        ),
    ] = StatGroupArg.agents,
    window: Annotated[
        float, typer.Option(min=1, max=300, help="Seconds to look back (1-300).")
    ] = 60.0,
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Golden metrics: requests, rate, success rate and latency percentiles (like linkerd viz stat).

    Numbers come from every sidecar's reports (sent every 2 s) merged by the control plane.
    """
    settings = settings_from(control_url=control_url)
    rows = _stats(settings, group.value, window)
    if output is Output.json:
        print_json(rows)
        return
    if not rows:
        console.print(
            f"no calls in the last {window:g}s (sidecars report every few seconds; "
            f"try `agentmesh stat {group.value} --window 300`)"
        )
        return
    covered = rows[0].window
    console.print(_stat_table(rows, f"{len(rows)} {group.value} · last {covered:.0f}s"))


def top(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    window: Annotated[
        float, typer.Option(min=1, max=300, help="Seconds each refresh looks back.")
    ] = 10.0,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 20,
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit (for scripts).")] = False,
    control_url: ControlUrl = None,
) -> None:
    """A live view of the busiest capabilities, refreshed until Ctrl-C."""
    settings = settings_from(control_url=control_url)
    if once:
        console.print(_top_view(settings, window, limit, fail=True))
        return
    from rich.live import Live

    with Live(_top_view(settings, window, limit), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(_top_view(settings, window, limit), refresh=True)


def _top_view(settings: Settings, window: float, limit: int, *, fail: bool = False) -> Any:
    now = datetime.now().strftime("%H:%M:%S")
    try:
        rows = _stats(settings, "capabilities", window)
    except MeshError as exc:
        if fail:
            raise
        return Text(f"{now}  {exc} (retrying)", style="red")
    rows.sort(key=lambda r: (-r.rps, r.name))
    title = f"busiest capabilities · last {window:g}s · {now}"
    if not rows:
        title += " · no calls yet"
    return _stat_table(rows[:limit], title, first="CAPABILITY")


# --------------------------------------------------------------------------------------
# tap
# --------------------------------------------------------------------------------------


def tap(
    capability: Annotated[str, typer.Argument(help="Capability whose calls to show.")],
    payloads: Annotated[
        bool,
        typer.Option(
            help="Show request and response bodies, where the serving agent allows it "
            "(AGENTMESH_TAP_PAYLOADS=true on that agent)."
        ),
    ] = False,
    max_events: Annotated[
        int | None, typer.Option("--max", min=1, help="Stop after this many calls.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds.")
    ] = None,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table (one line per call) or json lines.")
    ] = Output.table,
    control_url: ControlUrl = None,
    nats_url: Annotated[
        str | None, typer.Option(help="NATS URL; skips the control plane (AGENTMESH_NATS_URL).")
    ] = None,
) -> None:
    """Watch calls of a capability live: time, caller, serving instance, status, duration, trace.

    The sidecars serving CAPABILITY publish its calls only while a tap runs (and stop a few
    seconds after it ends), so tapping costs nothing the rest of the time.
    """
    settings = settings_from(control_url=control_url, nats_url=nats_url)
    asyncio.run(_tap(settings, capability, payloads, max_events, duration, output))


async def _tap(
    settings: Settings,
    capability: str,
    payloads: bool,
    max_events: int | None,
    duration: float | None,
    output: Output,
) -> None:
    from agentmesh.security.nats_client import client_connection
    from agentmesh.sidecar.bootstrap import bootstrap
    from agentmesh.telemetry.stats import tap_control_subject, tap_subject

    boot = await bootstrap(settings)
    tapper = f"tap-{socket.gethostname()}-{os.getpid()}"
    conn = await client_connection(
        settings, boot.nats_url, boot.registry_bucket, name=f"agentmesh-{tapper}"
    )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[bytes] = asyncio.Queue()
    acks: dict[str, TapAck] = {}
    first_ack = asyncio.Event()
    announced = False

    async def on_event(msg: Msg) -> None:
        events.put_nowait(msg.data)

    async def on_ack(msg: Msg) -> None:
        try:
            ack = TapAck.model_validate_json(msg.data)
        except ValidationError:
            return
        new = ack.instance_id not in acks
        acks[ack.instance_id] = ack
        first_ack.set()
        if new and announced:
            err_console.print(
                f"tapping {escape(ack.instance_id)} too", highlight=False, soft_wrap=True
            )
            _payload_note(payloads, [ack])

    try:
        nc = conn.client
        await nc.subscribe(tap_subject(boot.registry_bucket, capability), cb=on_event)
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_ack)
        request = TapRequest(
            capability=capability, payloads=payloads, ttl=_TAP_TTL, tapper=tapper
        ).model_dump_json()

        async def announce() -> None:
            while True:
                try:
                    await nc.publish(
                        tap_control_subject(boot.registry_bucket), request.encode(), reply=inbox
                    )
                except Exception as exc:  # NATS blips: the next announcement retries
                    err_console.print(
                        f"tap announcement failed: {exc}", highlight=False, soft_wrap=True
                    )
                await asyncio.sleep(_TAP_ANNOUNCE)

        announcer = loop.create_task(announce())
        try:
            try:
                await asyncio.wait_for(first_ack.wait(), 1.0)
                await asyncio.sleep(0.2)  # let the other instances answer too
            except TimeoutError:
                pass
            _announce_tap(capability, acks, payloads)
            announced = True
            await _print_events(events, max_events, duration, payloads, output)
        finally:
            announcer.cancel()
    finally:
        await conn.close()


def _announce_tap(capability: str, acks: dict[str, TapAck], payloads: bool) -> None:
    if acks:
        names = ", ".join(sorted(acks))
        err_console.print(
            f"tapping {escape(capability)!r} on {len(acks)} instance(s): {escape(names)} "
            "(Ctrl-C to stop)",
            highlight=False,
            soft_wrap=True,
        )
        _payload_note(payloads, list(acks.values()))
    else:
        err_console.print(
            f"tapping {escape(capability)!r}: no instance serves it yet; waiting (Ctrl-C to stop)",
            highlight=False,
            soft_wrap=True,
        )


def _payload_note(payloads: bool, acks: list[TapAck]) -> None:
    withheld = sorted(a.instance_id for a in acks if not a.payloads)
    if payloads and withheld:
        err_console.print(
            f"payloads withheld by {escape(', '.join(withheld))}: start that agent with "
            "AGENTMESH_TAP_PAYLOADS=true to allow them",
            highlight=False,
            soft_wrap=True,
        )


async def _print_events(
    events: asyncio.Queue[bytes],
    max_events: int | None,
    duration: float | None,
    payloads: bool,
    output: Output,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    shown = 0
    while max_events is None or shown < max_events:
        timeout = None if deadline is None else deadline - loop.time()
        if timeout is not None and timeout <= 0:
            return
        try:
            data = await asyncio.wait_for(events.get(), timeout)
        except TimeoutError:
            return
        try:
            event = TapEvent.model_validate_json(data)
        except ValidationError:
            continue
        shown += 1
        if output is Output.json:
            if not payloads:
                event = event.model_copy(update={"request": None, "response": None})
            print(event.model_dump_json(exclude_none=True), flush=True)
            continue
        print(_tap_line(event), flush=True)
        if payloads and event.request is not None:
            print(f"    > {event.request}", flush=True)
        if payloads and event.response is not None:
            print(f"    < {event.response}", flush=True)


def _tap_line(event: TapEvent) -> str:
    at = event.at.astimezone().strftime("%H:%M:%S.%f")[:-3]
    duration = _ms(event.duration_ms)
    trace = event.trace_id or "-"
    return (
        f"{at}  {event.caller} -> {event.instance_id}  {event.status}  {duration:>9}  trace={trace}"
    )


# --------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------


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
            info = await asyncio.wait_for(js.account_info(), 3.0)
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
            kv = await asyncio.wait_for(js.key_value(bucket), 3.0)
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
            keys = await asyncio.wait_for(kv.keys(), 3.0)
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
