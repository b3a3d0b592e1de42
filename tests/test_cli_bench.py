"""``agentmesh bench``: the benchmark suite as a command, run as a real process.

No timing is ever asserted (these run on shared CI machines); what is checked is that the
command finds the suite, lists its scenarios, rejects what it does not know with exit 2, and
that a real scenario prints its table and its goals and writes them as JSON. A packaging
check makes sure the wheel ships every file of the suite that the command needs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8")
TIMEOUT = 60


def bench(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``agentmesh bench ARGS`` in a fresh process, output as a pipe and a CI log get it."""
    script = Path(sys.executable).with_name("agentmesh")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agentmesh"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTMESH_", "OTEL_")) and k not in ("COLUMNS", "LINES")
    }
    env["AGENTMESH_DATA_DIR"] = str(tmp)
    return subprocess.run(
        [*command, "bench", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=TIMEOUT,
        check=False,
    )


def test_help_lists_every_scenario_with_its_goals(tmp_path: Path) -> None:
    done = bench("--help", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in SCENARIOS:
        assert f" {name} " in done.stdout, name
    assert "--quick" in done.stdout
    assert "M1 p50 ≤ 0.6 × B1 p50" in done.stdout
    assert "p99 < 5 µs" in done.stdout
    assert "M4 p50 − M1 p50 ≤ 0.5 ms (1 in flight)" in done.stdout


def test_unknown_scenario_exits_2_naming_the_known_ones(tmp_path: Path) -> None:
    done = bench("s1", "s9", tmp=tmp_path)
    assert done.returncode == 2
    assert "unknown scenario(s) s9; known: s1, s2, s3, s4, s5, s6, s7, s8" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_target_exits_2(tmp_path: Path) -> None:
    done = bench("s1", "--targets", "B0,X9", tmp=tmp_path)
    assert done.returncode == 2
    assert "unknown target(s) X9" in done.stderr


def test_s4_quick_prints_its_table_and_goals_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = bench("s4", "--quick", "--json", str(out), tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "machine" in done.stdout  # the header describes the machine
    assert "s4 · goals" in done.stdout
    assert "resolve p99 < 5 µs" in done.stdout
    assert "met" in done.stdout or "missed" in done.stdout
    report = json.loads(out.read_text())
    result = report["measurements"]["s4"]["result"]
    assert result["records"] == 10_000
    assert result["resolve"]["p99_us"] > 0
    goals = [g for g in report["goals"] if g["scenario"] == "s4"]
    assert goals
    assert all(isinstance(g["met"], bool) and g["value"] > 0 for g in goals)


def _shipped() -> dict[str, str]:
    """bench/ files the wheel force-includes, by name → path inside the wheel."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    return {Path(src).name: dst for src, dst in include.items() if src.startswith("bench/")}


def test_the_wheel_ships_every_file_the_suite_imports_or_runs() -> None:
    """Every sibling that a shipped file imports (relatively) or runs by path is shipped too,
    and no shipped file imports ``bench`` absolutely (the wheel's name is ``agentmesh._bench``).
    """
    shipped = _shipped()
    assert "run.py" in shipped
    assert all(dst.startswith("agentmesh/_bench/") for dst in shipped.values())
    needed: set[str] = set()
    for name in shipped:
        tree = ast.parse((ROOT / "bench" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module is None or not node.module.startswith("bench"), name
                if node.level == 1:
                    modules = [node.module] if node.module else [a.name for a in node.names]
                    needed.update(f"{m}.py" for m in modules)
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.endswith(".py")
                and (ROOT / "bench" / node.value).is_file()
            ):
                needed.add(node.value)
    assert needed <= set(shipped), sorted(needed - set(shipped))
