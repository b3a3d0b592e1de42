"""The dashboard at ``/ui`` in a real headless Chromium, against a real control plane process.

Nothing is mocked: the control plane runs as ``python -m agentmesh control`` on the test's NATS
and bucket, agents serve real HTTP in this process (``start_agent``), calls go through the mesh,
and the pages are driven by Playwright in Debian's Chromium (never a downloaded browser). Each
test saves screenshots under ``test-artifacts/dashboard/``.

Without Chromium these tests skip, saying how to install it; in CI (``CI`` set) they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from agentmesh import Mesh, MeshUnavailable, Settings, capability
from agentmesh.inbound.server import HttpServer, bind
from tests.conftest import StartAgent, WaitUntil
from tests.control.control_process import control_process, control_tls
from tests.flaky import flaky_endpoint
from tests.mesh_ca import mesh_ca

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Live fragments refresh every 2 s and sidecars report stats every 0.5 s here.
LIVE_TIMEOUT_MS = 12_000


def _chromium() -> str:
    path = os.environ.get("AGENTMESH_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    reason = None
    if path is None:
        reason = "Chromium is not installed: apt-get install chromium (Debian's package)"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            reason = "Playwright is not installed: pip install -e '.[dev]'"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert path is not None
    return path


class Echo(BaseModel):
    text: str
    length: int


@capability(version="1.1.0", tags=["demo"], idempotent=True)
async def echo(text: str, repeat: int = 1) -> Echo:
    """Repeat a text.

    Args:
        text: What to repeat.
        repeat: How many times.
    """
    out = " ".join([text] * repeat)
    return Echo(text=out, length=len(out))


@capability(version="0.2.0")
async def shout(text: str, mesh: Mesh) -> str:
    """Upper-case a text, after echoing it through the mesh."""
    value = await mesh.call("echo", {"text": text})
    return str(value["text"]).upper()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, but sidecars report call stats every 0.5 s."""
    return settings.model_copy(update={"stats_interval": 0.5})


@pytest.fixture
def control_url(nats_url: str, bucket: str, tmp_path: Path) -> Iterator[str]:
    """A real ``agentmesh control`` process on the test's NATS and bucket.

    It runs on the test CA (``tests/mesh_ca.py``), as the in-process agents do, so the calls
    of its try-it form pass their mTLS checks: one mesh, one CA.
    """
    extra = {"AGENTMESH_STATS_INTERVAL": "0.5", **mesh_ca().env()}
    with control_process(nats_url, bucket, tmp_path, env=extra) as url:
        yield url


@pytest.fixture
def admin_token(control_url: str, tmp_path: Path) -> str | None:
    """The control plane's admin token (it writes one into its data dir), if it has one."""
    path = tmp_path / "admin-token"
    return path.read_text().strip() if path.exists() else None


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fresh browser context in headless Chromium (never a downloaded browser).

    The control plane serves HTTPS with a certificate from the test's mesh CA, which this
    browser's trust store does not hold: certificate errors are ignored here (its clients in
    Python verify it, see ``control_tls``)."""
    executable = _chromium()
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield await chromium.new_context(
                viewport={"width": 1280, "height": 800}, ignore_https_errors=True
            )
        finally:
            await chromium.close()


@pytest.fixture
async def page(
    request: pytest.FixtureRequest,
    browser: Any,
    control_url: str,
    admin_token: str | None,
    tmp_path: Path,
) -> AsyncIterator[Any]:
    """A signed-in page (a session cookie from ``/ui/login``); saved as ``<test>-last.png``."""
    if admin_token is not None:
        async with httpx.AsyncClient(verify=control_tls(tmp_path)) as http:
            signed = await http.post(f"{control_url}/ui/login", data={"token": admin_token})
        assert signed.status_code == 303, signed.text
        await browser.add_cookies(
            [
                {
                    "name": "agentmesh_session",
                    "value": signed.cookies["agentmesh_session"],
                    "url": control_url,
                    "secure": True,
                    "httpOnly": True,
                    "sameSite": "Strict",
                }
            ]
        )
    tab = await browser.new_page()
    yield tab
    await tab.screenshot(path=ARTIFACTS / f"{request.node.name}-last.png", full_page=True)


async def _shot(page: Any, name: str) -> None:
    await page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


@pytest.fixture
def control_sees(
    control_url: str, admin_token: str | None, tmp_path: Path, wait_until: WaitUntil
) -> Callable[[int], Awaitable[None]]:
    """Wait until the control plane's registry lists at least ``count`` instances."""
    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}

    async def sees(count: int) -> None:
        async with httpx.AsyncClient(verify=control_tls(tmp_path), headers=headers) as http:

            async def ready() -> bool:
                resp = await http.get(f"{control_url}/v1/agents")
                return resp.status_code == 200 and len(resp.json()) >= count

            await wait_until(ready, timeout=10)

    return sees


async def test_pages_load_and_show_the_running_agents(
    control_sees: Callable[[int], Awaitable[None]],
    control_url: str,
    start_agent: StartAgent,
    wait_until: WaitUntil,
    page,
):
    from playwright.async_api import expect

    first = await start_agent([echo], name="echoer")
    second = await start_agent([echo], name="echoer")
    shouter = await start_agent([shout], name="shouter")
    await control_sees(3)

    resp = await page.goto(f"{control_url}/ui")
    assert resp is not None
    assert resp.status == 200
    await expect(page.locator('[data-stat="agents"]')).to_have_text("2")
    await expect(page.locator('[data-node="echoer"]')).to_be_visible()
    await expect(page.locator('[data-node="shouter"]')).to_be_visible()
    await _shot(page, "overview")

    await page.goto(f"{control_url}/ui/agents")
    await expect(page.locator("h1")).to_have_text("Agents and instances")
    for handle in (first, second, shouter):
        row = page.locator(f'[data-instance="{handle.instance_id}"]')
        await expect(row).to_contain_text("serving")
        await expect(row).to_contain_text(handle.endpoint)
    await expect(page.locator('[data-agent="echoer"] header')).to_contain_text("2 instances")
    await _shot(page, "agents")

    await page.goto(f"{control_url}/ui/capabilities")
    await expect(page.locator('[data-capability="echo"]')).to_contain_text("1.1.0")
    await expect(page.locator('[data-capability="echo"]')).to_contain_text("2 / 2")
    await page.click('[data-capability="echo"] a')
    await expect(page.locator("h1")).to_contain_text("echo")
    await expect(page.locator("body")).to_contain_text("How many times.")  # input schema
    await expect(page.locator("body")).to_contain_text('"length"')  # output schema (raw)
    await _shot(page, "capability")

    for path, title in (("/ui/policies", "Policies"), ("/ui/identities", "Identities")):
        resp = await page.goto(f"{control_url}{path}")
        assert resp is not None
        assert resp.status == 200
        await expect(page.locator("h1")).to_have_text(title)
        await expect(page.locator("main")).to_contain_text("/v1/")
    await page.goto(f"{control_url}/ui/policies")
    await _shot(page, "policies")

    resp = await page.goto(f"{control_url}/ui/capabilities/nothing-here")
    assert resp is not None
    assert resp.status == 404
    await expect(page.locator("main")).to_contain_text("no capability 'nothing-here'")


async def test_live_numbers_change_after_calls_without_a_reload(
    control_sees: Callable[[int], Awaitable[None]],
    control_url: str,
    start_agent: StartAgent,
    mesh: Mesh,
    wait_until: WaitUntil,
    page,
):
    from playwright.async_api import expect

    await start_agent([echo], name="echoer")
    await control_sees(1)
    await page.goto(f"{control_url}/ui")
    golden = page.locator('[data-agent-golden="echoer"]')
    await expect(golden).to_contain_text("no calls yet")
    await expect(page.locator('[data-stat="requests"]')).to_have_text("–")

    # A new agent shows up by itself, and so do the calls made after the page loaded.
    await start_agent([shout], name="shouter")
    await expect(page.locator('[data-agent="shouter"]')).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    for i in range(6):
        await mesh.call("echo", {"text": f"hello {i}"})
    assert await mesh.call("shout", {"text": "hi"}) == "HI"
    # echoer served 6 calls from the test and 1 from shouter.
    await expect(golden.locator('[data-metric="requests"]')).to_have_text(
        "7", timeout=LIVE_TIMEOUT_MS
    )
    await expect(page.locator('[data-stat="requests"]')).to_have_text("8")
    await expect(page.locator('[data-stat="success"]')).to_have_text("100%")
    # Arrows caller → callee: the test's client to both agents, shouter to echoer.
    for edge in ("client->echoer", "client->shouter", "shouter->echoer"):
        await expect(page.locator(f'[data-edge="{edge}"]')).to_have_count(1)
    await expect(
        page.locator('[data-edge-row="client->echoer"] [data-metric="requests"]')
    ).to_have_text("6")
    # The mTLS badge: on when every instance of the callee has an identity and an https endpoint.
    echoer = next(r for r in mesh.sidecar.index.records() if r.name == "echoer")
    secure = bool(echoer.identity) and echoer.endpoint.startswith("https://")
    await expect(page.locator('[data-edge-label="shouter->echoer"]')).to_contain_text(
        "mTLS on" if secure else "mTLS off"
    )
    await _shot(page, "overview-live")

    await page.goto(f"{control_url}/ui/topology")
    await expect(page.locator('[data-edge-row="shouter->echoer"]')).to_contain_text("100%")
    await _shot(page, "topology")


async def test_the_try_it_form_makes_a_real_call(
    control_sees: Callable[[int], Awaitable[None]],
    control_url: str,
    admin_token: str | None,
    start_agent: StartAgent,
    wait_until: WaitUntil,
    page,
    tmp_path: Path,
):
    from playwright.async_api import expect

    agent = await start_agent([echo], name="echoer")
    await control_sees(1)
    await page.goto(f"{control_url}/ui/capabilities/echo")
    payload = page.locator("textarea[name=payload]")
    # The form starts with a payload built from the input schema.
    assert json.loads(await payload.input_value()) == {"text": "", "repeat": 1}

    await payload.fill('{"text": "mesh", "repeat": 3}')
    await page.click("form.try button")
    result = page.locator("#try-result .result")
    await expect(result).to_have_attribute("data-ok", "true")
    await expect(result).to_contain_text(f"served by {agent.instance_id}")
    body = json.loads(await result.locator(".result-body").inner_text())
    assert body == {"text": "mesh mesh mesh", "length": 14}
    await _shot(page, "try-it")

    await payload.fill('{"repeat": "often"}')
    await page.click("form.try button")
    await expect(result).to_have_attribute("data-ok", "false")
    problem = json.loads(await result.locator(".result-body").inner_text())
    assert problem["status"] == 422
    assert problem["code"] == "invalid_input"
    assert {tuple(e["loc"]) for e in problem["errors"]} == {("text",), ("repeat",)}
    assert "text: Field required; repeat: Input should be a valid integer" in problem["detail"]
    await expect(result).to_contain_text("application/problem+json")
    await _shot(page, "try-it-problem")

    await payload.fill("{not json")
    await page.click("form.try button")
    await expect(result).to_contain_text("the payload is not JSON")

    # Without JavaScript the form still works: a plain POST renders the whole page.
    auth = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    async with httpx.AsyncClient(headers=auth, verify=control_tls(tmp_path)) as http:
        resp = await http.post(
            f"{control_url}/ui/capabilities/echo/try",
            data={"payload": '{"text": "plain"}', "timeout": "5"},
        )
        assert resp.status_code == 200
        assert "served by" in resp.text
        assert "&#34;plain&#34;" in resp.text
        # ... but not from another site: the form makes real calls.
        resp = await http.post(
            f"{control_url}/ui/capabilities/echo/try",
            data={"payload": "{}"},
            headers={"Origin": "https://evil.example"},
        )
        assert resp.status_code == 403


async def test_breaker_ejections_show_on_the_agents_page(
    control_sees: Callable[[int], Awaitable[None]],
    control_url: str,
    mesh: Mesh,
    wait_until: WaitUntil,
    page,
):
    from playwright.async_api import expect

    async with flaky_endpoint(mesh) as (flaky, flaky_id):
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))
        await control_sees(1)
        await page.goto(f"{control_url}/ui/agents")
        row = page.locator(f'[data-instance="{flaky_id}"]')
        await expect(row).to_contain_text("serving")
        for _ in range(5):
            with pytest.raises(MeshUnavailable):
                await mesh.call("work", retries=0)
        await expect(row).to_contain_text("ejected", timeout=LIVE_TIMEOUT_MS)
        await expect(row).to_contain_text(f"ejected by 1 sidecar: {mesh.sidecar.name}")
        await _shot(page, "agents-ejected")
        await page.goto(f"{control_url}/ui/topology")
        await expect(page.locator('[data-edge-label="client->flaky"]')).to_contain_text(
            "breaker open", timeout=LIVE_TIMEOUT_MS
        )
        await _shot(page, "topology-ejected")
        flaky.failing = False


async def test_signing_in_with_the_admin_token(control_url: str, admin_token: str | None, browser):
    from playwright.async_api import expect

    if admin_token is None:
        pytest.skip("this control plane asks for no admin token")
    page = await browser.new_page()
    await page.goto(f"{control_url}/ui/agents")
    await expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fagents$"))
    await page.fill("#token", "not-the-token")
    await page.click("form button")
    await expect(page.locator(".error")).to_contain_text("wrong admin token")
    await _shot(page, "sign-in")
    await page.fill("#token", admin_token)
    await page.click("form button")
    await expect(page).to_have_url(f"{control_url}/ui/agents")
    await expect(page.locator("h1")).to_have_text("Agents and instances")
    await page.click("text=sign out")
    await expect(page).to_have_url(f"{control_url}/ui/login")
    await page.goto(f"{control_url}/ui/topology")
    await expect(page).to_have_url(re.compile(r"/ui/login"))


@contextlib.asynccontextmanager
async def _attacker_site(control_url: str, target: str, fields: str) -> AsyncIterator[str]:
    """Another origin on 127.0.0.1 (HTTPS, so the browser treats it as the same *site* and sends
    the session cookie along): a page that posts a form to ``target`` on load."""
    page = (
        f'<form id="f" method="post" action="{control_url}{target}" enctype="text/plain">'
        f"{fields}</form><script>document.getElementById('f').submit()</script>"
    ).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html")],
            }
        )
        await send({"type": "http.response.body", "body": page})

    server = HttpServer(app, bind("127.0.0.1", 0), tls=mesh_ca().server_tls("attacker"))
    await server.start()
    try:
        yield f"https://127.0.0.1:{server.port}/"
    finally:
        await server.stop()


async def test_another_origin_cannot_use_the_session(
    control_url: str, admin_token: str | None, page, tmp_path: Path
):
    """Issue 12's CSRF, in a real browser signed in to the dashboard: a page on another origin
    of 127.0.0.1 posts a text/plain policy and an empty CA rotation. The browser sends the
    session cookie (same site), and the control plane refuses both by their Origin."""
    if admin_token is None:
        pytest.skip("this control plane asks for no admin token")
    # text/plain sends "name=value": the "=" lands inside the policy's description.
    policy = (
        '<input name=\'{"apiVersion":"agentmesh.dev/v1","kind":"AccessPolicy",'
        '"metadata":{"name":"pwned","description":"\' value=\'"},"spec":{"rules":[{"name":'
        '"deny-all","action":"deny","sources":[{"agent":"*"}],"targets":[{"capability":"*"}]}]}}\'>'
    )
    for target, fields in (("/v1/policies", policy), ("/v1/ca/rotate", "")):
        async with _attacker_site(control_url, target, fields) as evil:
            await page.goto(evil)
            await page.wait_for_url(f"{control_url}{target}")
            answer = json.loads(await page.locator("body").inner_text())
            # 403, not 401: the cookie came along, the Origin check refused it.
            assert answer["status"] == 403, answer
            assert "cross-site request refused" in answer["detail"]
    auth = {"authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(verify=control_tls(tmp_path), headers=auth) as http:
        policies = (await http.get(f"{control_url}/v1/policies")).text
        assert "pwned" not in policies
        assert (await http.get(f"{control_url}/v1/trust-bundle")).json()["version"] == 1


async def test_api_docs_render_without_the_internet(browser: Any, control_url: str) -> None:
    """``/docs`` draws the API with every request answered by the control plane itself."""
    from playwright.async_api import expect

    requested: list[str] = []

    async def only_local(route: Any) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith(control_url):
            await route.continue_()
        else:
            await route.abort()

    tab = await browser.new_page()
    await tab.route("**/*", only_local)
    await tab.goto(f"{control_url}/docs")
    paths = tab.locator(".opblock-summary-path")
    await expect(paths.filter(has_text="/v1/capabilities").first).to_be_visible()
    await expect(tab.locator(".information-container")).to_contain_text("agentmesh control plane")
    await _shot(tab, "api-docs")
    foreign = [url for url in requested if not url.startswith(control_url)]
    assert foreign == [], foreign
