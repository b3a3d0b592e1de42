"""What a reader needs to judge the numbers: the machine, its load and the software measured."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .processes import find_nats_server

__all__ = ["agentmesh_source", "machine_info"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nats_server_version() -> str:
    try:
        out = subprocess.run(
            [str(find_nats_server()), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return out.stdout.strip().removeprefix("nats-server:").strip() or out.stderr.strip()


def _git(directory: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def agentmesh_source() -> str:
    """Which agentmesh is measured: version, directory, commit and uncommitted changes.

    The mesh code changes under the benchmarks; a number means little without its commit.
    """
    try:
        import agentmesh
    except ImportError as exc:
        return f"not importable ({exc})"
    root = Path(agentmesh.__file__).resolve().parent.parent
    text = f"{getattr(agentmesh, '__version__', '?')} from {root}"
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if not commit:
        return text + " (not a git checkout)"
    dirty = _git(root, "status", "--porcelain", "--", "agentmesh").splitlines()
    text += f", git {commit}"
    if dirty:
        text += f" + {len(dirty)} uncommitted change(s) in agentmesh/"
    return text


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: hardware, load, and software versions."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    uvloop = _version("uvloop")
    httptools = _version("httptools")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {
            dist: _version(dist)
            for dist in ("aiohttp", "httpx", "uvicorn", "fastapi", "pydantic", "nats-py")
        },
        "nats_server": _nats_server_version(),
        "agentmesh": agentmesh_source(),
        "server_loop": "uvloop" if uvloop != "not installed" else "asyncio (uvloop not installed)",
        "server_http": (
            "httptools" if httptools != "not installed" else "h11 (httptools not installed)"
        ),
        "client_loop": "asyncio",
    }
