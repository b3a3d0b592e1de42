"""Policies through a real control plane process: the HTTP API, the CLI, and surviving its loss."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from agentmesh import PolicyDenied, capability
from agentmesh.nats_server import NatsServer
from tests.control.control_process import ControlProcess

from .conftest import (
    access_policy,
    call_unchecked,
    delete,
    run_cli,
    sources_for,
    traffic_policy,
    until_applied,
)

EXAMPLES = Path(__file__).parents[2] / "examples" / "policies"


@capability(version="1.2.0")
async def summarize(text: str = "") -> str:
    return text


async def test_apply_get_delete_and_history_with_the_cli(control: ControlProcess, tmp_path: Path):
    manifests = tmp_path / "policies"
    shutil.copytree(EXAMPLES, manifests)
    names = {"summarize-access", "research-access", "summarize-canary", "mesh-baseline"}

    code, out, err = await run_cli("apply", "-f", str(manifests), control=control)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4, out
    assert "accesspolicy/summarize-access created (revision " in out
    assert "trafficpolicy/summarize-canary created (revision " in out

    # Idempotent: the same manifests again change nothing.
    code, out, err = await run_cli("apply", "-f", str(manifests), "-o", "json", control=control)
    assert code == 0, err
    assert {c["result"] for c in json.loads(out)} == {"unchanged"}

    code, out, err = await run_cli("get", "policies", "-o", "json", control=control)
    assert code == 0, err
    listed = json.loads(out)
    assert {p["name"] for p in listed} == names
    canary_rev = next(p["revision"] for p in listed if p["name"] == "summarize-canary")

    # What `get -o yaml` prints can be applied again (read-only metadata is ignored).
    code, out, err = await run_cli(
        "get", "policy", "summarize-canary", "-o", "yaml", control=control
    )
    assert code == 0, err
    document = yaml.safe_load(out)
    assert document["metadata"]["revision"] == canary_rev
    assert document["spec"]["subsets"][1]["weight"] == 10
    code, out, err = await run_cli("apply", "-f", "-", control=control, stdin=out)
    assert code == 0, err
    assert out.strip() == f"trafficpolicy/summarize-canary unchanged (revision {canary_rev})"

    # A change, first as a dry run (nothing written), then for real.
    document["spec"]["subsets"][0]["weight"] = 80
    document["spec"]["subsets"][1]["weight"] = 20
    changed = yaml.safe_dump(document)
    code, out, err = await run_cli("apply", "--dry-run", "-f", "-", control=control, stdin=changed)
    assert code == 0, err
    assert out.strip() == "trafficpolicy/summarize-canary configured (dry run)"
    code, out, err = await run_cli("apply", "-f", "-", control=control, stdin=changed)
    assert code == 0, err
    assert "trafficpolicy/summarize-canary configured (revision " in out

    code, out, err = await run_cli("delete", "policy", "summarize-canary", control=control)
    assert code == 0, err
    assert "trafficpolicy/summarize-canary deleted (revision " in out
    code, out, err = await run_cli("get", "policy", "summarize-canary", control=control)
    assert code == 1
    assert err.strip() == "error: no policy named 'summarize-canary'"

    # Every change is a revision, the deletion included.
    code, out, err = await run_cli(
        "get", "policy", "summarize-canary", "--history", "-o", "json", control=control
    )
    assert code == 0, err
    history = json.loads(out)
    assert [h["operation"] for h in history] == ["put", "put", "delete"], history
    assert history[0]["revision"] == canary_rev
    assert [h["policy"]["spec"]["subsets"][1]["weight"] for h in history[:2]] == [10, 20]
    assert history[0]["revision"] < history[1]["revision"] < history[2]["revision"]

    # Tables, for people.
    code, out, err = await run_cli("get", "policies", control=control)
    assert code == 0, err
    assert "3 policies" in out, out
    assert "deny no-untrusted, allow planner-and-writer" in out, out
    code, out, err = await run_cli(
        "get", "policy", "summarize-canary", "--history", control=control
    )
    assert code == 0, err
    assert "delete" in out, out
    assert "split stable 80 / canary 20" in out, out


async def test_apply_reports_the_file_document_and_field_and_applies_nothing(
    control: ControlProcess, tmp_path: Path
):
    path = tmp_path / "two.yaml"
    path.write_text(
        yaml.safe_dump(
            access_policy(
                "first",
                {
                    "name": "ok",
                    "action": "allow",
                    "sources": [{"agent": "a"}],
                    "targets": [{"capability": "c"}],
                },
            )
        )
        + "---\n"
        + yaml.safe_dump(
            access_policy(
                "second",
                {
                    "name": "bad",
                    "action": "allow",
                    "sources": [{"agent": "Planner"}],
                    "targets": [{"capability": "c"}],
                },
            ),
            sort_keys=False,
        )
    )
    code, out, err = await run_cli("apply", "-f", str(path), control=control)
    assert code == 1
    assert out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {path}, document 2 (line "), line
    assert "spec.rules[0].sources[0].agent: agent 'Planner' must be lowercase" in line
    assert "nothing applied" in line
    code, out, _ = await run_cli("get", "policies", "-o", "json", control=control)
    assert json.loads(out) == []

    # Every problem of every document is printed, not the first and a count.
    many = tmp_path / "many.yaml"
    bad_rule = {"name": "r", "action": "permit", "sources": [{"agent": "Planner"}], "targets": []}
    many.write_text(
        yaml.safe_dump(access_policy("third", bad_rule))
        + "---\n"
        + yaml.safe_dump(traffic_policy("fourth", "summarize", timeout=-1, balance="fastest"))
    )
    code, out, err = await run_cli("apply", "-f", str(many), control=control)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0] == "error: 2 invalid documents; nothing applied:", err
    assert len(lines) == 3, err
    assert lines[1].strip().startswith(f"{many}, document 1 (line "), err
    assert lines[2].strip().startswith(f"{many}, document 2 (line "), err
    for field in (
        "spec.rules[0].action:",
        "spec.rules[0].sources[0].agent: agent 'Planner' must be lowercase",
        "spec.rules[0].targets:",
    ):
        assert field in lines[1], lines[1]
    for field in ("spec.timeout:", "spec.balance:"):
        assert field in lines[2], lines[2]
    assert "more" not in err

    # The control plane's own checks come back with the same location.
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(traffic_policy("t1", "summarize", timeout=1)))
    assert (await run_cli("apply", "-f", str(one), control=control))[0] == 0
    two = tmp_path / "other.yaml"
    two.write_text(yaml.safe_dump(traffic_policy("t2", "summarize", timeout=2)))
    code, _, err = await run_cli("apply", "-f", str(two), control=control)
    assert code == 1
    assert err.startswith(f"error: {two}, document 1")
    assert "TrafficPolicy 't1' already applies to capability 'summarize'" in err


async def test_the_api_refuses_invalid_policies_as_problem_documents(control: ControlProcess):
    async with httpx.AsyncClient(
        base_url=control.url, headers=control.headers(), verify=control.tls()
    ) as http:
        bad = access_policy("p", {"name": "r", "action": "permit", "sources": [], "targets": []})
        resp = await http.post("/v1/policies", json=bad)
        assert resp.status_code == 422
        assert resp.headers["content-type"] == "application/problem+json"
        problem = resp.json()
        assert problem["code"] == "invalid_input"
        locs = {e["loc"] for e in problem["errors"]}
        assert {"spec.rules[0].action", "spec.rules[0].sources"} <= locs
        # YAML bodies are accepted too, and PUT checks the name.
        good = yaml.safe_dump(traffic_policy("t", "summarize", timeout=2))
        resp = await http.put(
            "/v1/policies/t", content=good, headers={"content-type": "application/yaml"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"] == "created"
        resp = await http.put(
            "/v1/policies/other", content=good, headers={"content-type": "application/yaml"}
        )
        assert resp.status_code == 422
        resp = await http.get("/v1/policies/no-such")
        assert resp.status_code == 404
        resp = await http.get("/v1/policies/t")
        assert resp.json()["metadata"]["revision"] >= 1


async def test_sidecars_keep_enforcing_without_the_control_plane_or_nats(
    control: ControlProcess,
    nats_server: NatsServer,
    start_agent,
    mesh_as,
    mesh,
    settings,
    wait_until,
):
    server = await start_agent([summarize], name="summarizer")
    planner, intruder = await mesh_as("planner"), await mesh_as("intruder")
    policy = access_policy(
        "summarize-access",
        {
            "name": "planner-may-summarize",
            "action": "allow",
            "sources": sources_for("planner"),
            "targets": [{"capability": "summarize"}],
        },
    )
    async with httpx.AsyncClient(
        base_url=control.url, headers=control.headers(), verify=control.tls()
    ) as http:
        resp = await http.post("/v1/policies", json=policy)
        assert resp.status_code == 200, resp.text
    everyone = (server, planner, intruder, mesh)
    await until_applied(wait_until, *everyone, present=("summarize-access",))

    async def enforced() -> None:
        assert await planner.call("summarize", {"text": "ok"}) == "ok"
        with pytest.raises(PolicyDenied, match="rule 'planner-may-summarize'"):
            await intruder.call("summarize")
        with pytest.raises(PolicyDenied, match="rule 'planner-may-summarize'"):
            await call_unchecked(intruder, settings, "summarize")

    await asyncio.to_thread(control.stop)
    await enforced()

    nats_server.stop()
    try:
        await wait_until(lambda: not mesh.sidecar.conn.connected.is_set(), timeout=5)
        await enforced()  # the last good state, with NATS gone too
    finally:
        nats_server.start()
    await wait_until(lambda: mesh.sidecar.conn.connected.is_set(), timeout=10)
    await enforced()
    # Back in touch: a change made now reaches every sidecar through its resynchronised watch.
    await delete(mesh, "summarize-access")
    await until_applied(wait_until, *everyone, absent=("summarize-access",), timeout=10)
    assert await intruder.call("summarize", {"text": "now"}) == "now"


@pytest.mark.parametrize(
    "command", [["apply"], ["get", "policies"], ["get", "policy"], ["delete", "policy"]]
)
def test_each_policy_command_has_help(command: list[str]) -> None:
    from typer.testing import CliRunner

    from agentmesh.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
