"""The import graph keeps its shape: config types are a leaf, and ``policy/`` never imports
``sidecar/`` (the sidecar's layers apply policies; policies only produce settings)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agentmesh"


def _imports(path: Path) -> set[str]:
    """Every agentmesh module ``path`` imports, at any depth (TYPE_CHECKING and functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "agentmesh" or name.startswith("agentmesh.")}


def test_the_config_leaf_imports_nothing_of_agentmesh():
    assert _imports(PACKAGE / "_config.py") == set()


def test_policies_never_import_the_sidecar():
    offenders = {
        f"policy/{path.name}": sorted(
            m for m in _imports(path) if m.startswith("agentmesh.sidecar")
        )
        for path in (PACKAGE / "policy").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_loading_the_traffic_policies_loads_no_outbound_layer():
    """The same, as the interpreter sees it: nothing of ``agentmesh.sidecar`` comes along."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "import agentmesh._config, agentmesh.policy.traffic, agentmesh.policy.cache\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('agentmesh.sidecar'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == []
