"""The floor under S7: how long a bare Python process takes to import what any agent needs.

``python bench/startup_floor.py [--runs N]`` starts N fresh interpreters that import only
nats-py (without its aiohttp import, as ``agentmesh/_nats.py`` does), pydantic with
pydantic-settings, and uvicorn's HTTP protocol, with the garbage collector paused as
``python -m agentmesh`` does, and prints each process's wall time and the import times.
No agentmesh code runs: whatever this prints is out of reach for S7 (agent start → first
call ≤ 250 ms) unless one of these packages leaves the agent's start path.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_CHILD = """
import gc, sys, time, types
gc.disable()
t0 = time.perf_counter()
sys.modules["aiohttp"] = types.ModuleType("aiohttp")
import nats.aio.client, nats.js
del sys.modules["aiohttp"]
t1 = time.perf_counter()
import pydantic, pydantic_settings
t2 = time.perf_counter()
import uvicorn.protocols.http.httptools_impl, uvicorn.server
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="fresh processes (default 9)")
    args = parser.parse_args(argv)
    walls: list[float] = []
    parts: list[tuple[float, ...]] = []
    for _ in range(args.runs):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True
        ).stdout
        walls.append(time.perf_counter() - started)
        parts.append(tuple(float(x) for x in out.split()))
    for name, i in (("nats-py", 0), ("pydantic + pydantic-settings", 1), ("uvicorn", 2)):
        print(f"{name:30} import median {statistics.median(p[i] for p in parts) * 1000:5.0f} ms")
    shown = ", ".join(f"{w * 1000:.0f}" for w in walls)
    print(f"{'process start → imported':30} median {statistics.median(walls) * 1000:5.0f} ms")
    print(f"  each: {shown} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
