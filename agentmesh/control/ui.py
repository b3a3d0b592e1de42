"""The dashboard at ``/ui``: server-rendered pages of the mesh, live without a JavaScript build.

Pages are Jinja2 templates (``templates/``). Their live parts are fragments that poll their own
URL under ``/ui/_/`` with htmx (vendored in ``static/htmx.min.js``) and swap themselves in
place, so a browser without JavaScript still gets complete pages, only not self-refreshing.

Every number on a page comes from one method of :class:`DashboardData`: agents and instances from
the control plane's watch-fed registry index, breaker ejections from the :class:`HealthBook`,
golden metrics from the stats book (when the control plane has one), policies and identities
from the control plane's own ``/v1`` API (so those pages say "none yet" until the API exists).

The try-it form makes a real call through the mesh from the control plane's sidecar, as any
client would, and shows the value or the ``application/problem+json`` document of the failure.
It is an admin action: cross-site form posts are refused (``Origin``/``Sec-Fetch-Site``).

The dashboard is its own small ASGI app, mounted at ``/ui`` by ``create_app``, so that it can
answer a browser without the admin token with a sign-in page (``/ui/login``) instead of a 401
document: the page checks the token with the control plane's own ``AdminAuth`` and starts a
session (``agentmesh.control.sessions``: a signed, expiring cookie, never the token), which the
API accepts too; signing out is a POST.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp

from agentmesh._version import __version__
from agentmesh.control.health import HealthBook
from agentmesh.control.layout import GraphLayout, layered_layout
from agentmesh.control.nats_status import NatsView, nats_view
from agentmesh.control.security import AdminAuth
from agentmesh.control.sessions import SESSION_COOKIE, same_origin
from agentmesh.control.stats import StatsBook
from agentmesh.errors import AuthenticationFailed, InvalidInput, MeshError, RateLimited
from agentmesh.models import AgentRecord, CapabilityOffer, CapabilitySpec, StatGroup, StatRow
from agentmesh.settings import Settings
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["DashboardData", "Golden", "dashboard_app"]

#: How often live fragments re-fetch themselves, in seconds.
REFRESH_SECONDS = 2.0
#: The window of the golden metrics shown, in seconds.
STATS_WINDOW = 60.0
#: A streaming capability tried from the form shows at most this many chunks.
_MAX_TRY_CHUNKS = 200
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class Golden:
    """Golden metrics of one agent, capability or edge over the stats window."""

    requests: int
    rps: float
    success: float | None  # fraction of successful calls, None without calls
    p50: float | None  # seconds
    p95: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class InstanceView:
    record: AgentRecord
    ejected_by: list[str]
    probing_by: list[str]
    age: str

    @property
    def health(self) -> str:
        """serving / unready / draining, or ``ejected`` when some sidecar's breaker is open."""
        if self.ejected_by:
            return "ejected"
        if self.probing_by:
            return "probing"
        return self.record.status


@dataclass(frozen=True, slots=True)
class AgentView:
    name: str
    instances: list[InstanceView]
    golden: Golden | None

    @property
    def versions(self) -> list[str]:
        return sorted({i.record.version for i in self.instances})

    @property
    def capabilities(self) -> list[str]:
        return sorted({c.name for i in self.instances for c in i.record.capabilities})

    @property
    def health(self) -> str:
        """``ok`` if every instance serves, ``bad`` if none does, else ``warn``."""
        serving = sum(1 for i in self.instances if i.health == "serving")
        if serving == len(self.instances):
            return "ok"
        return "bad" if serving == 0 else "warn"


@dataclass(frozen=True, slots=True)
class CapabilityView:
    name: str
    offers: list[CapabilityOffer]
    golden: Golden | None

    @property
    def spec(self) -> CapabilitySpec:
        """The spec of the newest version on offer (what the try-it form shows)."""
        from packaging.version import Version

        return max((o.capability for o in self.offers), key=lambda s: Version(s.version))

    @property
    def versions(self) -> list[str]:
        return sorted({o.capability.version for o in self.offers})

    @property
    def agents(self) -> list[str]:
        return sorted({o.agent for o in self.offers})

    @property
    def serving(self) -> int:
        return sum(1 for o in self.offers if o.status == "serving")


@dataclass(frozen=True, slots=True)
class EdgeView:
    """Calls from one caller to one callee agent (``-``: no live instance was found)."""

    caller: str
    callee: str
    golden: Golden


@dataclass(frozen=True, slots=True)
class TopologyEdge:
    """One arrow of the graph: the calls ``caller`` makes to ``callee``."""

    caller: str
    callee: str
    golden: Golden | None
    breaker: str  # "closed", "probing" (half-open somewhere) or "open" (an instance ejected)
    mtls: bool
    path: str
    label_x: float
    label_y: float


@dataclass(frozen=True, slots=True)
class TopologyNode:
    name: str
    external: bool  # a caller that is not a registered agent (a script, the control plane)
    health: str
    subtitle: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class TopologyView:
    nodes: list[TopologyNode]
    edges: list[TopologyEdge]
    rows: list[EdgeView]
    width: float
    height: float
    has_stats: bool


@dataclass(frozen=True, slots=True)
class Summary:
    agents: int
    instances: int
    serving: int
    capabilities: int
    ejected: int
    golden: Golden | None


@dataclass(frozen=True, slots=True)
class ApiListing:
    """Rows of a control-plane API the dashboard shows generically (policies, identities)."""

    path: str
    available: bool  # False: the control plane has no such API yet
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    full: tuple[str, ...] = ()  # columns shown whole, as indented JSON


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


def _age(started: datetime, now: datetime) -> str:
    seconds = max(int((now - started).total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def golden_of(row: StatRow) -> Golden:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000

    return Golden(
        requests=row.requests,
        rps=row.rps,
        success=row.success_rate,
        p50=seconds(row.p50_ms),
        p95=seconds(row.p95_ms),
        p99=seconds(row.p99_ms),
    )


class DashboardData:
    """Where every page's data comes from: one method per page section."""

    def __init__(
        self,
        sidecar: Sidecar,
        health: HealthBook,
        stats: StatsBook | None = None,
        *,
        api: ASGIApp | None = None,
        window: float = STATS_WINDOW,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sidecar = sidecar
        self.health = health
        self.stats = stats
        #: The control plane's API app, asked in-process for policies and identities.
        self.api = api
        self.window = window
        self._clock = clock

    # ---- golden metrics -----------------------------------------------------------------------

    def _stats_rows(self, group: StatGroup) -> list[StatRow]:
        return [] if self.stats is None else self.stats.rows(group, self.window)

    def agent_golden(self) -> dict[str, Golden]:
        """What each agent served (inbound calls, all its instances)."""
        return {row.name: golden_of(row) for row in self._stats_rows("agents")}

    def capability_golden(self) -> dict[str, Golden]:
        """What callers asked of each capability (outbound calls, failed resolutions included)."""
        return {row.name: golden_of(row) for row in self._stats_rows("capabilities")}

    def edges(self) -> list[EdgeView]:
        """Calls caller → callee, as the callers' sidecars reported them."""
        return [
            EdgeView(row.caller, row.callee, golden_of(row))
            for row in self._stats_rows("edges")
            if row.caller is not None and row.callee is not None
        ]

    def total_golden(self) -> Golden | None:
        rows = list(self.agent_golden().values())
        if not rows:
            return None
        return _merge(rows)

    # ---- registry and health ------------------------------------------------------------------

    def instances(self) -> list[InstanceView]:
        records = self.sidecar.index.records()
        health = {h.instance_id: h for h in self.health.health(r.instance_id for r in records)}
        now = self._clock()
        return [
            InstanceView(
                record=r,
                ejected_by=health[r.instance_id].ejected_by,
                probing_by=health[r.instance_id].probing_by,
                age=_age(r.started_at, now),
            )
            for r in records
        ]

    def agents(self) -> list[AgentView]:
        golden = self.agent_golden()
        by_name: dict[str, list[InstanceView]] = defaultdict(list)
        for instance in self.instances():
            by_name[instance.record.name].append(instance)
        return [AgentView(n, by_name[n], golden.get(n)) for n in sorted(by_name)]

    def capabilities(self) -> list[CapabilityView]:
        golden = self.capability_golden()
        offers: dict[str, list[CapabilityOffer]] = defaultdict(list)
        for offer in self.sidecar.index.find():
            offers[offer.capability.name].append(offer)
        return [CapabilityView(n, offers[n], golden.get(n)) for n in sorted(offers)]

    def capability(self, name: str) -> CapabilityView | None:
        offers = self.sidecar.index.find(name)
        if not offers:
            return None
        return CapabilityView(name, offers, self.capability_golden().get(name))

    def nats(self) -> NatsView:
        """The overview's NATS card: the embedded server's supervisor state, else the link."""
        return nats_view(self.sidecar.conn, getattr(self.api, "state", None))

    def summary(self) -> Summary:
        instances = self.instances()
        return Summary(
            agents=len({i.record.name for i in instances}),
            instances=len(instances),
            serving=sum(1 for i in instances if i.health == "serving"),
            capabilities=len(self.sidecar.index.capabilities()),
            ejected=sum(1 for i in instances if i.ejected_by),
            golden=self.total_golden(),
        )

    def topology(self) -> TopologyView:
        agents = {a.name: a for a in self.agents()}
        rows = self.edges()
        pairs = {(row.caller, row.callee): row for row in rows}
        layout: GraphLayout = layered_layout(agents, pairs)
        nodes = []
        for name, box in sorted(layout.nodes.items()):
            agent = agents.get(name)
            if name == "-":
                health, subtitle = "bad", "no live instance"
            elif agent is None:
                health, subtitle = "none", "caller (not an agent)"
            else:
                count = len(agent.instances)
                health = agent.health
                subtitle = f"{count} instance{'s' if count != 1 else ''}"
                if agent.golden is not None and agent.golden.requests:
                    subtitle += f" · {agent.golden.rps:.2g}/s in"
            nodes.append(
                TopologyNode(
                    name, agent is None, health, subtitle, box.x, box.y, box.width, box.height
                )
            )
        edges = []
        for geometry in layout.edges:
            key = (geometry.source, geometry.target)
            callee = agents.get(geometry.target)
            instances = callee.instances if callee else []
            if any(i.ejected_by for i in instances):
                breaker = "open"
            elif any(i.probing_by for i in instances):
                breaker = "probing"
            else:
                breaker = "closed"
            mtls = bool(instances) and all(
                i.record.identity and i.record.endpoint.startswith("https://") for i in instances
            )
            edges.append(
                TopologyEdge(
                    caller=key[0],
                    callee=key[1],
                    golden=pairs[key].golden,
                    breaker=breaker,
                    mtls=mtls,
                    path=geometry.path,
                    label_x=geometry.label_x,
                    label_y=geometry.label_y,
                )
            )
        return TopologyView(
            nodes, edges, rows, layout.width, layout.height, has_stats=self.stats is not None
        )

    # ---- APIs other parts of the control plane provide ----------------------------------------

    async def policies(self, request: Request) -> ApiListing:
        """The access and traffic policies (``GET /v1/policies``), once that API exists."""
        return await _api_listing(
            self.api, request, "/v1/policies", shape=_policy_row, full=("spec",)
        )

    async def identities(self, request: Request) -> ApiListing:
        """The agent identities (``GET /v1/identities``), once that API exists."""
        return await _api_listing(self.api, request, "/v1/identities")


def _merge(rows: Iterable[Golden]) -> Golden:
    """Sum rates; weight success by requests; latency quantiles: the worst (an upper bound)."""
    items = list(rows)
    requests = sum(g.requests for g in items)
    successes = sum(g.success * g.requests for g in items if g.success is not None)

    def worst(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    return Golden(
        requests=requests,
        rps=sum(g.rps for g in items),
        success=successes / requests if requests else None,
        p50=worst(g.p50 for g in items),
        p95=worst(g.p95 for g in items),
        p99=worst(g.p99 for g in items),
    )


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


def _policy_row(item: dict[str, Any]) -> dict[str, Any]:
    """A ``PolicyRevision`` as a row: name, kind, revision, time and the spec in full."""
    policy = item.get("policy") or {}
    return {
        "name": item.get("name"),
        "kind": policy.get("kind", ""),
        "revision": item.get("revision"),
        "updated": item.get("updated"),
        "spec": policy.get("spec") if policy else f"invalid: {item.get('error')}",
    }


async def _api_listing(
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


# ---- schemas and the try-it form ---------------------------------------------------------------


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


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


# ---- the router --------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("agentmesh.control", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def ms(seconds: float | None) -> str:
        if seconds is None:
            return "–"
        if seconds < 0.001:
            return f"{seconds * 1e6:.0f} µs"
        if seconds < 1:
            return f"{seconds * 1000:.3g} ms"
        return f"{seconds:.3g} s"

    def pct(fraction: float | None) -> str:
        if fraction is None:
            return "–"
        if fraction >= 1:
            return "100%"
        if fraction <= 0:
            return "0%"
        return f"{math.floor(fraction * 1000) / 10:.1f}%"

    def rate(rps: float | None) -> str:
        if not rps:
            return "0/s"
        return f"{rps:.3g}/s"

    env.filters.update(ms=ms, pct=pct, rate=rate, pretty=_pretty)
    env.globals.update(version=__version__, refresh=REFRESH_SECONDS)
    return env


def _static(name: str) -> bytes:
    return files("agentmesh.control").joinpath("static", name).read_bytes()


class _SignIn(Exception):
    """The request needs the admin token: send the browser to the sign-in page."""


#: Paths of the dashboard that answer without the admin token.
_OPEN = ("/login", "/logout", "/static/")
#: Where the dashboard's pages may load anything from: only the control plane itself.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def dashboard_app(
    sidecar: Sidecar,
    health: HealthBook,
    *,
    stats: StatsBook | None = None,
    api: ASGIApp | None = None,
    auth: AdminAuth | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    """The dashboard, to mount at ``/ui``: ``app.mount("/ui", dashboard_app(...))``.

    ``api`` is the control plane's own app (policies and identities are read from it);
    ``auth`` is its admin check (``AdminAuth``): without a valid token or session the pages
    send the browser to ``/ui/login``, which starts a session (a signed cookie that the API
    accepts too). Without ``auth`` the dashboard is open.
    """
    data = DashboardData(sidecar, health, stats, api=api)
    env = _environment()

    async def guard(request: Request) -> None:
        if auth is None:
            return
        tail = request.url.path[len(request.scope.get("root_path", "")) :]
        if tail.startswith(_OPEN):
            return
        try:
            await auth(request)
        except AuthenticationFailed as exc:
            raise _SignIn(str(exc)) from exc

    app = FastAPI(
        title="agentmesh dashboard",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(guard)],
    )

    @app.exception_handler(MeshError)
    async def _refused(request: Request, exc: MeshError) -> Response:
        """A cross-site write (403) or too many failed sign-ins (429), as the API says it."""
        return Response(
            exc.to_problem(instance=request.url.path).model_dump_json(exclude_none=True),
            status_code=exc.status,
            media_type="application/problem+json",
        )

    @app.exception_handler(_SignIn)
    async def _sign_in(request: Request, exc: _SignIn) -> Response:
        base = request.scope.get("root_path", "")
        page = request.url.path
        if request.headers.get("hx-request") == "true":
            current = urlsplit(request.headers.get("hx-current-url", "")).path
            page = current or base + "/"
        target = f"{base}/login?{urlencode({'next': page})}"
        if request.headers.get("hx-request") == "true":
            # htmx follows HX-Redirect whatever the status: the whole page goes to sign in.
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    app.include_router(_routes(data, env, settings, auth=auth, sidecar=sidecar))
    return app


def _routes(
    data: DashboardData,
    env: jinja2.Environment,
    settings: Settings | None,
    *,
    auth: AdminAuth | None,
    sidecar: Sidecar,
) -> APIRouter:
    router = APIRouter()
    statics = {
        name: (_static(name), _STATIC_TYPES[name[name.rfind(".") :]])
        for name in ("htmx.min.js", "dashboard.css")
    }
    mesh: list[Any] = []  # the Mesh, made on first use (it needs the running loop)
    window_label = f"last {STATS_WINDOW:.0f} s"

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        html = env.get_template(template).render(
            base=base,
            path=request.url.path.rstrip("/") or "/",
            window=window_label,
            data=data,
            signed_in=auth is not None and SESSION_COOKIE in request.cookies,
            nats_open=sidecar.conn.unauthenticated,
            **context,
        )
        return HTMLResponse(
            html,
            status_code=status,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
        )

    def fragment(request: Request) -> bool:
        return request.headers.get("hx-request") == "true"

    async def form(request: Request) -> dict[str, str]:
        fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items()}

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in statics:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type = statics[name]
        return Response(
            body,
            media_type=media_type,
            headers={"Cache-Control": f"public, max-age=3600, immutable; v={__version__}"},
        )

    # ---- signing in: the admin token, for a session cookie ---------------------------------------

    def _next(request: Request, value: str | None) -> str:
        """Where to go after signing in: a dashboard page, never another site."""
        base: str = request.scope.get("root_path", "")
        if (
            value
            and value.startswith(base + "/")
            and not value.startswith("//")
            and "\\" not in value
        ):
            return value
        return base + "/"

    @router.get("/login")
    async def login_page(request: Request, next: str | None = None) -> HTMLResponse:
        return render(request, "login.html", next=_next(request, next), error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await form(request)
        target = _next(request, fields.get("next"))
        token = fields.get("token", "").strip()
        response = RedirectResponse(target, status_code=303)
        if auth is None:
            return response
        if not same_origin(request):
            return Response("cross-site request refused", 403, media_type="text/plain")
        source = request.client.host if request.client else "unknown"
        try:
            if not token:
                raise AuthenticationFailed("enter the admin token")
            auth.check_token(token, source)
        except (AuthenticationFailed, RateLimited) as exc:
            return render(request, "login.html", status=exc.status, next=target, error=str(exc))
        response.set_cookie(
            SESSION_COOKIE,
            auth.sessions.issue(),
            max_age=int(auth.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        if not same_origin(request, require=True):
            return Response("cross-site request refused", 403, media_type="text/plain")
        response = RedirectResponse(f"{request.scope.get('root_path', '')}/login", 303)
        session = request.cookies.get(SESSION_COOKIE)
        if auth is not None and session is not None:
            auth.sessions.end(session)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=request.url.scheme == "https", httponly=True
        )
        return response

    # ---- pages ---------------------------------------------------------------------------------

    @router.get("/")
    async def overview(request: Request) -> HTMLResponse:
        return render(
            request,
            "overview.html",
            summary=data.summary(),
            agents=data.agents(),
            topology=data.topology(),
        )

    @router.get("/agents")
    async def agents(request: Request) -> HTMLResponse:
        return render(request, "agents.html", agents=data.agents())

    @router.get("/capabilities")
    async def capabilities(request: Request) -> HTMLResponse:
        return render(request, "capabilities.html", capabilities=data.capabilities())

    @router.get("/capabilities/{name}")
    async def capability(request: Request, name: str) -> HTMLResponse:
        return _capability_page(request, name, None, None)

    def _capability_page(
        request: Request, name: str, result: TryResult | None, payload: str | None
    ) -> HTMLResponse:
        view = data.capability(name)
        if view is None:
            return render(request, "missing.html", status=404, what=f"capability {name!r}")
        spec = view.spec
        return render(
            request,
            "capability.html",
            cap=view,
            name=name,
            spec=spec,
            inputs=schema_fields(spec.input_schema),
            outputs=schema_fields(spec.output_schema),
            payload=payload if payload is not None else _pretty(example_for(spec.input_schema)),
            result=result,
        )

    @router.post("/capabilities/{name}/try")
    async def try_capability(request: Request, name: str) -> Response:
        if not same_origin(request):
            return Response("cross-site request refused", status_code=403, media_type="text/plain")
        fields = await form(request)
        payload = fields.get("payload", "")
        timeout = fields.get("timeout", "").strip()
        version = fields.get("version", "").strip() or None
        result = await _try(request, name, payload, timeout, version)
        if fragment(request):
            return render(request, "_try_result.html", result=result)
        return _capability_page(request, name, result, payload)

    async def _try(
        request: Request, name: str, payload_text: str, timeout_text: str, version: str | None
    ) -> TryResult:
        from agentmesh.mesh import Mesh

        if not mesh:
            mesh.append(Mesh(sidecar, settings or Settings(), owner=False))
        handle: Mesh = mesh[0]
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
            targets = sidecar.index.targets(name)
            if targets and any(t.spec.streaming for t in targets):
                chunks = []
                async for chunk in handle.stream(name, payload, timeout=timeout, version=version):
                    chunks.append(chunk)
                    if len(chunks) >= _MAX_TRY_CHUNKS:
                        break
                elapsed = asyncio.get_running_loop().time() - started
                return TryResult(
                    name, True, _pretty(chunks), elapsed_ms=elapsed * 1000, chunks=len(chunks)
                )
            out = await handle.invoke(name, payload, timeout=timeout, version=version)
        except MeshError as exc:
            elapsed = asyncio.get_running_loop().time() - started
            problem = exc.to_problem(instance=request.url.path)
            return TryResult(
                name,
                False,
                _pretty(problem.model_dump(exclude_none=True)),
                elapsed_ms=elapsed * 1000,
                status=exc.status,
            )
        return TryResult(
            name,
            True,
            _pretty(out.value),
            served_by=out.instance_id,
            endpoint=out.endpoint,
            elapsed_ms=out.elapsed * 1000,
            attempts=out.attempts,
        )

    @router.get("/topology")
    async def topology(request: Request) -> HTMLResponse:
        return render(request, "topology.html", topology=data.topology())

    @router.get("/policies")
    async def policies(request: Request) -> HTMLResponse:
        listing = await data.policies(request)
        return render(request, "listing.html", title="Policies", listing=listing)

    @router.get("/identities")
    async def identities(request: Request) -> HTMLResponse:
        listing = await data.identities(request)
        return render(request, "listing.html", title="Identities", listing=listing)

    # ---- live fragments: each re-fetches itself every REFRESH_SECONDS -------------------------

    @router.get("/_/summary")
    async def summary_fragment(request: Request) -> HTMLResponse:
        return render(request, "_summary.html", summary=data.summary())

    @router.get("/_/agents")
    async def agents_fragment(request: Request) -> HTMLResponse:
        return render(request, "_agents.html", agents=data.agents())

    @router.get("/_/capabilities")
    async def capabilities_fragment(request: Request) -> HTMLResponse:
        return render(request, "_capabilities.html", capabilities=data.capabilities())

    @router.get("/_/capabilities/{name}")
    async def offers_fragment(request: Request, name: str) -> HTMLResponse:
        view = data.capability(name)
        return render(request, "_offers.html", cap=view, name=name)

    @router.get("/_/topology")
    async def topology_fragment(request: Request) -> HTMLResponse:
        return render(request, "_topology.html", topology=data.topology())

    @router.get("/{rest:path}")
    async def not_found(request: Request, rest: str) -> Response:
        if rest.endswith("/"):
            return RedirectResponse(f"{request.scope.get('root_path', '')}/{rest.rstrip('/')}")
        return render(request, "missing.html", status=404, what=f"page {request.url.path}")

    return router
