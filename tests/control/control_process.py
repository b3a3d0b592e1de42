"""Start ``python -m agentmesh control`` as a real process on a given NATS (test helper)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.mesh_ca import mesh_ca

#: What the CLI processes of the tests run with: no AGENTMESH_* of the caller's, no terminal.
CLI_TIMEOUT = 30


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTMESH_") and k not in ("COLUMNS", "LINES")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def control_process(
    nats_url: str,
    bucket: str,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    own_ca: bool = False,
) -> Iterator[str]:
    """A control plane on ``nats_url`` and ``bucket``; yields its URL; SIGTERM at the end.

    It runs with the suite's test CA, as the in-process sidecars of the test do: one mesh has
    one CA (each side refuses the other's signed state and records otherwise); ``own_ca``:
    a self-managed CA in its data dir instead. ``env`` adds variables.
    """
    ready = tmp_path / "control.json"
    log_path = tmp_path / "control.log"
    env = cli_env(
        {
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_DATA_DIR": str(tmp_path),
            **({} if own_ca else mesh_ca().env()),
            **(env or {}),
        }
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentmesh",
                "control",
                "--port",
                "0",
                "--nats-url",
                nats_url,
                "--ready-file",
                str(ready),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(1000):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert ready.exists(), log_path.read_text()
        yield json.loads(ready.read_text())["control_url"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise


def run_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m agentmesh ARGS`` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def arun_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``run_cli`` for async tests: the event loop (and in-process agents' leases) keeps going."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentmesh",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(
        list(args), proc.returncode, out.decode("utf-8"), err.decode("utf-8")
    )
