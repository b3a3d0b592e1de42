"""The ``agentmesh`` command line: its commands, and what a user sees when they get it wrong.

A user error must be one readable line on stderr starting with ``error:`` and exit code 1,
never a traceback. The error cases run as real ``python -m agentmesh`` processes (the entry
point's error handling is part of what is tested), all at once, since each costs an
interpreter start and none needs a server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentmesh import cli
from agentmesh.cli import _COMMANDS, _module_group, app

COMMANDS = ("control", "run", "sidecar", "demo", "agents", "find", "call")
TIMEOUT = 30
#: How long a CLI command may take to report that NATS is unreachable (interpreter start
#: included; the sidecar's own connect timeout is 5 s).
UNREACHABLE_DEADLINE = 10.0


def cli_env(tmp: Path) -> dict[str, str]:
    """No AGENTMESH_* from the caller, no control plane (a closed port), state in ``tmp``.

    COLUMNS and LINES are dropped so the output is what a pipe or a CI log gets.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTMESH_") and k not in ("COLUMNS", "LINES")
    }
    env["AGENTMESH_CONTROL_URL"] = "http://127.0.0.1:9"
    env["AGENTMESH_DATA_DIR"] = str(tmp)
    return env


def test_help_lists_the_commands(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("agentmesh")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agentmesh"]
    done = subprocess.run(
        [*command, "--help"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # Every command, in the table's order, each with the first words of its own help (which
    # only its module knows).
    rows = [done.stdout.find(f"\n│ {name} ") for name in _COMMANDS]
    assert -1 not in rows, done.stdout
    assert rows == sorted(rows), done.stdout
    assert "Run an agent: serve its capabilities" in done.stdout
    assert "Join tokens: how a new agent or client enrols." in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert command in result.output


def test_the_command_table_names_what_each_module_registers() -> None:
    """The CLI imports a command's module when the command is used: the table it looks the
    module up in must name every command each module registers, and nothing else."""
    modules = sorted(
        p.stem for p in Path(cli.__file__).parent.glob("*.py") if "def register(" in p.read_text()
    )
    assert sorted(set(_COMMANDS.values())) == modules
    for module in modules:
        registered = set(_module_group(module).commands)
        assert registered == {n for n, m in _COMMANDS.items() if m == module}, module


def test_a_mistyped_command_gets_a_suggestion() -> None:
    result = CliRunner().invoke(app, ["idnetity"])
    assert result.exit_code == 2
    assert "Did you mean 'identity'?" in result.output


# --------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------

NO_CAPABILITIES = '"""Nothing to serve here."""\n\nANSWER = 42\n'

UNANNOTATED = '''"""A capability with a parameter the schema cannot describe."""
from agentmesh import capability


@capability
async def greet(who, times: int = 1) -> str:
    return "hi " * times + str(who)
'''


BROKEN_SYNTAX = '''"""A typo a newcomer makes."""
from agentmesh import capability


@capability
async def echo(text: str) -> str
    return text
'''

MISSING_IMPORT = '''"""An agent whose dependency is not installed."""
from agentmesh import capability
import agentmesh_no_such_module_anywhere


@capability
async def echo(text: str) -> str:
    return text
'''

FAILS_AT_IMPORT = '''"""An agent whose module-level code raises."""
SETTINGS = {}
TIMEOUT = SETTINGS["timeout"]
'''


VALID = '''"""A fine agent; only the NATS it is pointed at is missing."""
from agentmesh import capability


@capability
async def echo(text: str) -> str:
    return text
'''


@dataclass(frozen=True)
class Case:
    args: list[str]
    expected: list[str]  # substrings of the one-line message
    env: dict[str, str] | None = None
    timeout: float = TIMEOUT


@dataclass(frozen=True)
class Outcome:
    args: list[str]
    expected: list[str]
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def user_errors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """Every error case, run concurrently once per module: case id → what the user saw."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "no_caps.py").write_text(NO_CAPABILITIES)
    (tmp / "unannotated.py").write_text(UNANNOTATED)
    (tmp / "valid.py").write_text(VALID)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    cases = {
        "agents-control-plane-down": Case(
            ["agents"], ["control plane at http://127.0.0.1:9", "agentmesh control"]
        ),
        "run-missing-file": Case(["run", "/nonexistent.py"], ["/nonexistent.py", "no such file"]),
        "run-no-capabilities": Case(
            ["run", str(tmp / "no_caps.py")], ["no_caps.py", "no @capability"]
        ),
        "run-unannotated-parameter": Case(
            ["run", str(tmp / "unannotated.py")], ["'who'", "no type annotation"]
        ),
        "call-payload-not-json": Case(["call", "x", "not json"], ["payload is not JSON"]),
        "control-port-taken": Case(
            ["control", "--port", str(port), "--nats-url", "nats://127.0.0.1:9"],
            [f"127.0.0.1:{port}", "--port"],
        ),
        "call-nats-unreachable": Case(
            ["call", "research", "{}"],
            ["nats://127.0.0.1:9"],
            # mTLS off: the error is about NATS, not about enrolling (which comes first).
            env={"AGENTMESH_NATS_URL": "nats://127.0.0.1:9", "AGENTMESH_MTLS": "off"},
            timeout=UNREACHABLE_DEADLINE,
        ),
        "run-nats-unreachable": Case(
            ["run", str(tmp / "valid.py")],
            ["nats://127.0.0.1:9"],
            # mTLS off: the error is about NATS, not about enrolling (which comes first).
            env={"AGENTMESH_NATS_URL": "nats://127.0.0.1:9", "AGENTMESH_MTLS": "off"},
            timeout=UNREACHABLE_DEADLINE,
        ),
    }
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "agentmesh", *case.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**cli_env(tmp), **(case.env or {})},
            cwd=tmp,
        )
        for key, case in cases.items()
    }
    started = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    try:
        for key, proc in procs.items():
            timeout = cases[key].timeout
            try:
                out, err = proc.communicate(timeout=max(started + timeout - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\n(still running after {timeout}s; killed)"
            case = cases[key]
            outcomes[key] = Outcome(case.args, case.expected, proc.returncode, out, err)
        yield outcomes
    finally:
        held.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


ERROR_CASES = [
    "agents-control-plane-down",
    "run-missing-file",
    "run-no-capabilities",
    "run-unannotated-parameter",
    "call-payload-not-json",
    "control-port-taken",
    "call-nats-unreachable",
    "run-nats-unreachable",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_error_is_one_line_and_exit_code_1(user_errors: dict[str, Outcome], case: str) -> None:
    seen = user_errors[case]
    assert seen.code == 1, f"{seen.args}: exit {seen.code}\n{seen.stderr}"
    assert "Traceback" not in seen.stderr, seen.stderr
    lines = [line for line in seen.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"one line, not {len(lines)}: {lines}"
    assert lines[0].startswith("error:"), lines[0]
    for expected in seen.expected:
        assert expected in lines[0], lines[0]
    assert seen.stdout == "", seen.stdout


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (BROKEN_SYNTAX, ["line 6: syntax error"]),
        (
            MISSING_IMPORT,
            ["line 3: ModuleNotFoundError", "agentmesh_no_such_module_anywhere"],
        ),
        (FAILS_AT_IMPORT, ["line 3: KeyError: 'timeout'"]),
    ],
    ids=["syntax-error", "missing-import", "fails-at-import"],
)
def test_an_agent_file_that_does_not_load_is_one_line_naming_file_and_line(
    tmp_path: Path, source: str, expected: list[str]
) -> None:
    """Not the 47-line traceback of importlib's frames: the file, the line, the reason."""
    agent = tmp_path / "broken_agent.py"
    agent.write_text(source)
    done = subprocess.run(
        [sys.executable, "-m", "agentmesh", "run", str(agent)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"one line, not {len(lines)}: {lines}"
    assert lines[0].startswith(f"error: {agent}, "), lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    assert done.stdout == ""
