"""``kind: Agent`` manifests: what a valid one yields, and errors that name document and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentmesh import InvalidInput
from agentmesh.proxy.manifest import load_agent_manifest, parse_agent_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "polyglot" / "agent.yaml"


def manifest(**capability: object) -> dict[str, object]:
    return {
        "apiVersion": "agentmesh.dev/v1",
        "kind": "Agent",
        "metadata": {"name": "tool"},
        "spec": {"capabilities": [{"name": "work", **capability}]},
    }


def test_the_example_manifest_gives_the_registry_its_specs() -> None:
    declared = load_agent_manifest(str(EXAMPLE))
    assert declared.metadata.name == "headliner"
    specs = {c.name: c.spec() for c in declared.spec.capabilities}
    assert set(specs) == {"shout", "countdown", "headline"}
    assert specs["countdown"].streaming
    assert specs["shout"].idempotent
    assert specs["shout"].timeout == 5
    assert specs["shout"].tags == ("text", "en")
    assert specs["shout"].input_schema["required"] == ["text"]
    assert [c.app_path for c in declared.spec.capabilities] == [
        "/shout",
        "/countdown",
        "/headline",
    ]


def test_defaults_a_path_per_capability_and_an_object_input() -> None:
    [cap] = parse_agent_manifest(manifest()).spec.capabilities
    assert cap.app_path == "/work"
    assert cap.input == {"type": "object"}
    assert cap.spec().version == "0.1.0"


@pytest.mark.parametrize(
    ("capability", "field", "says"),
    [
        ({"input": {"type": "objekt"}}, "spec.capabilities[0].input", "not a valid JSON Schema"),
        ({"output": {"minimum": "x"}}, "spec.capabilities[0].output", "not a valid JSON Schema"),
        ({"version": "one"}, "spec.capabilities[0].version", "not a PEP 440 version"),
        ({"tags": ["two words"]}, "spec.capabilities[0].tags", "without spaces"),
        ({"path": "no-slash"}, "spec.capabilities[0].path", "must start with '/'"),
        ({"timeout": 0}, "spec.capabilities[0].timeout", "greater than 0"),
        ({"streams": True}, "spec.capabilities[0].streams", "Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_field(capability: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(InvalidInput) as error:
        parse_agent_manifest(manifest(**capability))
    assert error.value.message.startswith(f"Agent 'tool': {field}: ")
    assert says in error.value.message
    assert error.value.errors[0]["loc"] == field


def test_every_problem_is_listed() -> None:
    document = manifest(name="bad name!")
    document["metadata"] = {"name": "Tool_"}
    with pytest.raises(InvalidInput) as error:
        parse_agent_manifest(document)
    assert {e["loc"] for e in error.value.errors} == {"metadata.name", "spec.capabilities[0].name"}
    assert "(and 1 more)" in error.value.message


def test_two_capabilities_with_one_name_are_refused() -> None:
    document = manifest()
    document["spec"] = {"capabilities": [{"name": "a"}, {"name": "a"}]}
    with pytest.raises(InvalidInput, match=r"spec\.capabilities: two capabilities named 'a'"):
        parse_agent_manifest(document)


def test_a_file_error_names_the_file_document_and_line(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(
        "apiVersion: agentmesh.dev/v1\n"
        "kind: AccessPolicy\n"
        "metadata: {name: p}\n"
        "spec: {rules: []}\n"
        "---\n"
        "apiVersion: agentmesh.dev/v1\n"
        "kind: Agent\n"
        "metadata: {name: tool}\n"
        "spec:\n"
        "  capabilities:\n"
        "    - name: work\n"
        "      input: {type: objekt}\n"
    )
    with pytest.raises(InvalidInput) as error:
        load_agent_manifest(str(path))
    assert error.value.message.startswith(
        f"{path}, document 2 (line 12): Agent 'tool': spec.capabilities[0].input: "
        "not a valid JSON Schema"
    )


def test_a_file_without_exactly_one_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    text = EXAMPLE.read_text()
    path.write_text(text + "\n---\n" + text)
    with pytest.raises(InvalidInput, match="expected exactly one document of kind Agent, found 2"):
        load_agent_manifest(str(path))


def test_the_cli_reports_a_manifest_error_in_one_line_before_joining_the_mesh(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "apiVersion: agentmesh.dev/v1\nkind: Agent\nmetadata: {name: tool}\n"
        "spec:\n  capabilities:\n    - name: work\n      version: one\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentmesh",
            "sidecar",
            "--manifest",
            str(path),
            "--app",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9"},
    )
    assert done.returncode == 1
    assert f"{path}, document 1 (line 7): Agent 'tool': spec.capabilities[0].version:" in (
        " ".join(done.stderr.split())
    )


def test_the_cli_refuses_a_card_with_a_manifest_or_an_app_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentmesh",
            "sidecar",
            "--card",
            "http://127.0.0.1:9/.well-known/agent-card.json",
            "--",
            "node",
            "app.js",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9"},
    )
    assert done.returncode == 1
    assert "--card reads the card of a running app" in " ".join(done.stderr.split())
