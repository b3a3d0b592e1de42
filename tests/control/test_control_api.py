"""The control plane process: a start without warnings, ``/docs`` offline, ``/metrics``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentmesh import capability
from tests.control.control_process import arun_cli, cli_env, control_process, control_tls
from tests.mesh_ca import mesh_ca
from tests.promtool import check_metrics


@capability
async def ping() -> str:
    return "pong"


def _admin(tmp_path: Path) -> dict[str, str]:
    return {"authorization": f"Bearer {(tmp_path / 'admin-token').read_text().strip()}"}


def test_starts_without_warnings_and_serves_its_docs_from_the_package(
    nats_url: str, bucket: str, tmp_path: Path
) -> None:
    # Every warning is an error in this process: one at start (or at the first /openapi.json,
    # where FastAPI builds the body schemas) would stop it.
    env = {"PYTHONWARNINGS": "error"}
    with (
        control_process(nats_url, bucket, tmp_path, env=env) as url,
        httpx.Client(verify=control_tls(tmp_path)) as http,
    ):
        assert http.get(f"{url}/openapi.json").status_code == 200
        page = http.get(f"{url}/docs")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets, page.text
        assert {a.rsplit("/", 1)[-1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
        for asset in assets:
            assert asset.startswith("/docs/static/"), f"{asset}: not served by the control plane"
            got = http.get(f"{url}{asset}")
            assert got.status_code == 200, asset
            assert len(got.content) > 500, asset
        assert "cdn." not in page.text
        assert http.get(f"{url}/redoc").status_code == 404, "ReDoc would need a CDN"
        assert http.get(f"{url}/healthz").status_code == 200
    log = (tmp_path / "control.log").read_text()
    assert "Warning" not in log, log
    assert "Traceback" not in log, log


def _samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_enrolments_policy_changes_and_mesh_state(
    start_agent, nats_url: str, bucket: str, tmp_path: Path
) -> None:
    await start_agent([ping], name="pinger")
    policy = yaml.safe_dump(
        {
            "apiVersion": "agentmesh.dev/v1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "ping-traffic"},
            "spec": {"capability": "ping", "timeout": 2},
        }
    )
    yaml_body = {"content-type": "application/yaml"}
    with control_process(nats_url, bucket, tmp_path, env=mesh_ca().env()) as url:
        async with httpx.AsyncClient(
            base_url=url, headers=_admin(tmp_path), verify=control_tls(tmp_path)
        ) as http:
            assert (await http.post("/v1/policies", content=policy, headers=yaml_body)).json()[
                "result"
            ] == "created"
            dry = await http.post(
                "/v1/policies", params={"dry_run": "true"}, content=policy, headers=yaml_body
            )
            assert dry.json()["dry_run"] is True
            same = await http.post("/v1/policies", content=policy, headers=yaml_body)
            assert same.json()["result"] == "unchanged"
            assert (await http.delete("/v1/policies/ping-traffic")).json()["result"] == "deleted"
            refused = await http.post("/v1/certificates", json={"csr": "not a csr", "token": "x"})
            assert refused.status_code >= 400
            assert (await http.get("/v1/agents/no-such-instance")).status_code == 404
            assert (await http.get("/no/such/path")).status_code == 404
            assert (await http.get("/ui/agents")).status_code == 200
            # An enrolment: a CLI call joins with the control plane's join token.
            env = cli_env({"AGENTMESH_CONTROL_URL": url, "AGENTMESH_DATA_DIR": str(tmp_path)})
            called = await arun_cli("call", "ping", env=env)
            assert called.returncode == 0, called.stderr

            # Open like /healthz: a scraper needs no admin token (one would let it write).
            async with httpx.AsyncClient(verify=control_tls(tmp_path)) as scraper:
                scraped = await scraper.get(f"{url}/metrics")
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
            openapi = (await http.get("/openapi.json")).json()
            assert "/metrics" not in openapi["paths"]

    exposition = scraped.text
    samples = _samples(exposition)
    requests = "agentmesh_control_api_requests_total"
    assert _get(samples, requests, method="POST", route="/v1/policies", status="200") == 3
    assert _get(samples, requests, method="DELETE", route="/v1/policies/{name}", status="200") == 1
    assert (
        _get(samples, requests, method="GET", route="/v1/agents/{instance_id}", status="404") == 1
    )
    assert _get(samples, requests, method="GET", route="(unmatched)", status="404") == 1
    # The dashboard's routes carry their mount's prefix.
    assert _get(samples, requests, method="GET", route="/ui/agents", status="200") == 1
    changes = "agentmesh_control_policy_changes_total"
    for result in ("created", "unchanged", "deleted"):
        assert _get(samples, changes, kind="TrafficPolicy", result=result) == 1, result
    assert not any(
        name == changes and ("result", "configured") in labels for name, labels in samples
    )
    certificates = "agentmesh_control_certificate_requests_total"
    assert _get(samples, certificates, result="refused") == 1
    assert _get(samples, certificates, result="issued") == 1
    assert _get(samples, "agentmesh_control_registry_instances") == 1
    assert _get(samples, "agentmesh_control_nats_connected") == 1
    assert "process_cpu_seconds_total" in exposition or "python_gc_objects" in exposition

    await asyncio.to_thread(check_metrics, exposition)
