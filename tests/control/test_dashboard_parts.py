"""The dashboard's parts without a browser: layout, schema helpers, pages served in-process.

The browser tests (``test_dashboard.py``) drive the real thing; these pin the pieces they rely
on, fast: the layered layout's geometry, the example payload built from a schema, the cross-site
guard, and the ``/ui`` routes of ``create_app`` on a real sidecar (NATS, agents, stats book).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request

from agentmesh import Mesh, capability
from agentmesh.control.app import create_app
from agentmesh.control.health import HealthBook
from agentmesh.control.layout import NodeBox, layered_layout
from agentmesh.control.security import COOKIE, AdminAuth
from agentmesh.control.sessions import same_origin
from agentmesh.control.stats import StatsBook
from agentmesh.control.ui import dashboard_app
from agentmesh.control.ui.schema import example_for, schema_fields
from agentmesh.models import BreakerEvent, StatsEntry, StatsReport
from agentmesh.telemetry.stats import LATENCY_SCHEME, bucket_of
from tests.conftest import StartAgent, WaitUntil
from tests.mesh_ca import mesh_ca

DEMO_EDGES = [
    ("client", "planner"),
    ("client", "researcher"),
    ("client", "summarizer"),
    ("client", "writer"),
    ("planner", "researcher"),
    ("planner", "summarizer"),
]


def _overlap(a: NodeBox, b: NodeBox) -> bool:
    return not (
        a.x + a.width <= b.x
        or b.x + b.width <= a.x
        or a.y + a.height <= b.y
        or b.y + b.height <= a.y
    )


def test_layout_puts_callers_left_of_callees_and_never_overlaps_boxes():
    layout = layered_layout(["planner", "researcher", "summarizer", "writer", "idle"], DEMO_EDGES)
    layers = {name: box.layer for name, box in layout.nodes.items()}
    assert layers == {
        "client": 0,
        "idle": 0,
        "planner": 1,
        "writer": 1,
        "researcher": 2,
        "summarizer": 2,
    }
    # Idle agents go below the traffic.
    assert layout.nodes["idle"].y > layout.nodes["client"].y
    for a, b in itertools.combinations(layout.nodes.values(), 2):
        assert not _overlap(a, b), (a.name, b.name)
    for box in layout.nodes.values():
        assert box.x + box.width <= layout.width
        assert box.y + box.height <= layout.height
    assert [(e.source, e.target) for e in layout.edges] == sorted(DEMO_EDGES)
    for edge in layout.edges:
        source, target = layout.nodes[edge.source], layout.nodes[edge.target]
        assert edge.kind == "forward"
        assert edge.path.startswith(f"M{source.x + source.width:.1f},")
        assert edge.path.endswith(f"{target.x:.1f},{target.y + target.height / 2:.1f}")
        # Labels never sit on a box (long edges get a placeholder slot of their own).
        for box in layout.nodes.values():
            inside = box.x < edge.label_x < box.x + box.width
            assert not (inside and box.y < edge.label_y < box.y + box.height), (edge, box.name)


def test_layout_draws_cycles_and_self_calls():
    layout = layered_layout(["a", "b", "c"], [("a", "b"), ("b", "a"), ("c", "c")])
    kinds = {(e.source, e.target): e.kind for e in layout.edges}
    assert kinds == {("a", "b"): "forward", ("b", "a"): "back", ("c", "c"): "self"}
    assert layout.nodes["a"].layer < layout.nodes["b"].layer
    assert layered_layout([], []).nodes == {}


class Address(BaseModel):
    city: str
    zip_code: str = "00000"


def test_example_payloads_follow_the_schema():
    @capability
    def ship(
        name: str,
        address: Address,
        count: int = 2,
        express: bool = False,
        tags: list[str] | None = None,
        mode: str | None = None,
    ) -> str:
        """Ship something."""
        return name

    schema = ship.spec.input_schema
    assert example_for(schema) == {
        "name": "",
        "address": {"city": "", "zip_code": "00000"},
        "count": 2,
        "express": False,
        "tags": None,
        "mode": None,
    }
    rows = {r["name"]: r for r in schema_fields(schema)}
    assert rows["name"]["required"] == "yes"
    assert rows["address"]["type"] == "Address"
    assert rows["count"]["default"] == "2"
    assert rows["tags"]["type"] == "array of string | null"


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"host": "127.0.0.1:7700"}, True),
        ({"host": "127.0.0.1:7700", "origin": "http://127.0.0.1:7700"}, True),
        ({"host": "127.0.0.1:7700", "sec-fetch-site": "same-origin"}, True),
        ({"host": "127.0.0.1:7700", "origin": "https://evil.example"}, False),
        ({"host": "127.0.0.1:7700", "origin": "null"}, False),
        ({"host": "127.0.0.1:7700", "sec-fetch-site": "cross-site"}, False),
    ],
)
def test_the_try_it_form_refuses_cross_site_posts(headers: dict[str, str], allowed: bool):
    assert same_origin(_request(headers)) is allowed
    # A write authorized by the session cookie must say where it comes from.
    says = "origin" in headers or "sec-fetch-site" in headers
    assert same_origin(_request(headers), require=True) is (allowed and says)


class Echo(BaseModel):
    text: str


@capability(version="2.0.0", tags=["demo"])
async def echo(text: str) -> Echo:
    """Say it back."""
    return Echo(text=text)


@capability
async def count(to: int = 3) -> AsyncIterator[int]:
    """Count up, one chunk per number."""
    for i in range(1, to + 1):
        yield i


def _report(entries: list[dict[str, Any]]) -> StatsReport:
    now = datetime.now(UTC)
    return StatsReport(
        reporter="test",
        scheme=LATENCY_SCHEME,
        start=now,
        end=now,
        entries=[
            StatsEntry(**e, total=e["count"] * 0.004, buckets=[(bucket_of(0.004), e["count"])])
            for e in entries
        ],
    )


async def test_pages_served_by_create_app(
    mesh: Mesh, start_agent: StartAgent, wait_until: WaitUntil
):
    running = await start_agent([echo], name="echoer")
    await start_agent([count], name="counter")
    health = HealthBook()
    stats = StatsBook()
    signer = mesh_ca().policy_signer(mesh.sidecar.policies.store)
    app = create_app(mesh.sidecar, mesh.sidecar.boot, health, stats, policies=signer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        assert (await http.get("/ui")).headers["location"].endswith("/ui/")
        page = await http.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script src="/ui/static/htmx.min.js"' in page.text
        assert 'hx-trigger="every 2s"' in page.text
        assert f'data-instance="{running.instance_id}"' in page.text

        script = await http.get("/ui/static/htmx.min.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.text.startswith("/* htmx 2.")
        assert (await http.get("/ui/static/secret.py")).status_code == 404
        assert (await http.get("/ui/agents/")).headers["location"] == "/ui/agents"
        assert (await http.get("/ui/nothing")).status_code == 404
        # The dashboard is not part of the API's OpenAPI document.
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert not [p for p in paths if p.startswith("/ui")]

        # Numbers: what the sidecars report, and who ejects whom.
        stats.add(
            _report(
                [
                    {"direction": "outbound", "agent": "client", "capability": "echo",
                     "peer": "echoer", "status": "ok", "count": 9},
                    {"direction": "outbound", "agent": "client", "capability": "echo",
                     "peer": "echoer", "status": "connection_failed", "count": 1},
                    {"direction": "inbound", "agent": "echoer", "capability": "echo",
                     "status": "200", "count": 9},
                ]
            )
        )  # fmt: skip
        event = BreakerEvent(observer="client-1", instance_id=running.instance_id, state="open")
        health.apply(event.model_dump_json().encode())
        topology = (await http.get("/ui/_/topology")).text
        assert 'data-edge="client->echoer"' in topology
        assert "90.0%" in topology  # 9 of 10 calls returned
        assert "breaker open" in topology
        record = next(
            r for r in mesh.sidecar.index.records() if r.instance_id == running.instance_id
        )
        secure = bool(record.identity) and record.endpoint.startswith("https://")
        assert ("mTLS on" if secure else "mTLS off") in topology
        agents = (await http.get("/ui/_/agents")).text
        assert "ejected by 1 sidecar: client-1" in agents
        assert '<b data-metric="requests">9</b>' in agents
        catalogue = (await http.get("/ui/capabilities")).text
        assert "2.0.0" in catalogue
        assert "Say it back." in catalogue

        # The try-it form: a fragment for htmx, a whole page without it.
        form = {"payload": '{"text": "hi"}'}
        fragment = await http.post(
            "/ui/capabilities/echo/try", data=form, headers={"HX-Request": "true"}
        )
        assert fragment.status_code == 200
        assert fragment.text.lstrip().startswith('<div class="result ok"')
        assert f"served by <code>{running.instance_id}</code>" in fragment.text
        streamed = await http.post(
            "/ui/capabilities/count/try",
            data={"payload": '{"to": 4}'},
            headers={"HX-Request": "true"},
        )
        assert "✔ 4 chunks" in streamed.text
        whole = await http.post("/ui/capabilities/echo/try", data=form)
        assert "<!doctype html>" in whole.text
        missing = await http.post(
            "/ui/capabilities/nope/try", data=form, headers={"HX-Request": "true"}
        )
        assert 'data-ok="false"' in missing.text
        assert "&#34;code&#34;: &#34;capability_not_found&#34;" in missing.text
        assert "HTTP 404" in missing.text

        for path in ("/ui/policies", "/ui/identities"):
            listing = await http.get(path)
            assert listing.status_code == 200
            assert "None yet" in listing.text or "<table" in listing.text
        # Policies come from the control plane's own /v1/policies, once it has them.
        manifest = {
            "apiVersion": "agentmesh.dev/v1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "echo-timeout"},
            "spec": {"capability": "echo", "timeout": 5},
        }
        applied = await http.post("/v1/policies", json=manifest)
        assert applied.is_success, applied.text

        async def listed() -> bool:  # the policy store's reads may lag its writes a little
            return "echo-timeout" in (await http.get("/ui/policies")).text

        await wait_until(listed, timeout=5)
        listing = await http.get("/ui/policies")
        assert '<td class="small">echo-timeout</td>' in listing.text
        assert "TrafficPolicy" in listing.text
        assert "&#34;timeout&#34;: 5" in listing.text


class _Fake:
    """Stands in for the control plane's sidecar where the pages only read the registry."""

    def __init__(self) -> None:
        from agentmesh.registry import LocalIndex, NatsConnection

        self.index = LocalIndex()
        self.conn = NatsConnection("nats://127.0.0.1:4222", name="never-connected")


def _signed_app(*, public_read: bool = False) -> FastAPI:
    api = FastAPI()
    auth = AdminAuth("s3cret", public_read=public_read)
    ui = dashboard_app(_Fake(), HealthBook(), stats=StatsBook(), auth=auth)  # type: ignore[arg-type]
    api.mount("/ui", ui)
    return api


async def test_the_dashboard_asks_for_the_admin_token():
    transport = httpx.ASGITransport(app=_signed_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        page = await http.get("/ui/agents")
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=%2Fui%2Fagents"
        # A live fragment sends the whole page to sign in (htmx follows HX-Redirect).
        live = await http.get(
            "/ui/_/agents",
            headers={"HX-Request": "true", "HX-Current-URL": "http://control/ui/topology"},
        )
        assert live.status_code == 401
        assert live.headers["hx-redirect"] == "/ui/login?next=%2Fui%2Ftopology"
        assert (await http.get("/ui/static/htmx.min.js")).status_code == 200
        sign_in = await http.get("/ui/login")
        assert sign_in.status_code == 200
        assert "frame-ancestors 'none'" in sign_in.headers["content-security-policy"]

        wrong = await http.post("/ui/login", data={"token": "guess", "next": "/ui/agents"})
        assert wrong.status_code == 401
        assert "wrong admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
        elsewhere = await http.post(
            "/ui/login",
            data={"token": "s3cret"},
            headers={"Origin": "https://evil.example"},
        )
        assert elsewhere.status_code == 403

        signed = await http.post("/ui/login", data={"token": "s3cret", "next": "/ui/agents"})
        assert signed.status_code == 303
        assert signed.headers["location"] == "/ui/agents"
        cookie = signed.headers["set-cookie"]
        # A signed, expiring session: never the admin token itself.
        assert cookie.startswith(f"{COOKIE}=v1.")
        assert "s3cret" not in cookie
        assert "Max-Age=28800" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain http here; under HTTPS it is (test_https.py)
        assert (await http.get("/ui/agents")).status_code == 200  # the client keeps the cookie
        assert "sign out" in (await http.get("/ui/agents")).text

        # Never back to another site after signing in.
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            away = await http.post("/ui/login", data={"token": "s3cret", "next": target})
            assert away.headers["location"] == "/ui/"

        # Signing out is a POST from the dashboard's own pages, never a link another site
        # could make the browser follow.
        link = await http.get("/ui/logout")
        assert link.status_code == 404
        assert "set-cookie" not in link.headers
        forged = await http.post("/ui/logout", headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403
        assert (await http.get("/ui/agents")).status_code == 200
        session = http.cookies[COOKIE]
        out = await http.post("/ui/logout", headers={"Origin": "http://control"})
        assert out.headers["location"] == "/ui/login"
        assert (await http.get("/ui/agents")).status_code == 303
        # A copy of the signed-out cookie is refused too.
        http.cookies.set(COOKIE, session)
        assert (await http.get("/ui/agents")).status_code == 303


async def test_public_read_opens_the_pages_but_not_the_try_it_form():
    transport = httpx.ASGITransport(app=_signed_app(public_read=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        assert (await http.get("/ui/agents")).status_code == 200
        tried = await http.post("/ui/capabilities/echo/try", data={"payload": "{}"})
        assert tried.status_code == 303
        assert tried.headers["location"].startswith("/ui/login")
