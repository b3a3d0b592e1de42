"""Profile the mesh path with py-spy: where the CPU of a mesh call goes, on both sides.

``python bench/profile_mesh.py record --concurrency 1 --duration 8 --side client --out DIR``
starts a mesh target (M1, or M2/M3 with ``--target``: nats-server, one agent, a client ``Mesh``
in this process), drives a closed loop of ``Mesh.call`` at the given concurrency and, meanwhile,
runs ``py-spy record --format speedscope`` on this process (``client``: the caller plus its
in-process sidecar) or on the agent process (``agent``: uvicorn, the inbound app, the
capability). py-spy samples only threads that are running (not blocked in ``epoll_wait``), so
the shares are shares of the CPU a side actually spends.

``python bench/profile_mesh.py top FILE.speedscope.json`` prints the top functions by self and
by inclusive time, and the self time by package (the "what dominates" table of
``docs/benchmarks.md``).

Needs ``pip install py-spy`` (and ptrace rights over the profiled process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loops import closed_loop
from bench.mesh_targets import MeshCall, TracedMeshCall
from bench.procfs import proc_cpu_seconds
from bench.results import percentile
from bench.workloads import make_payload

__all__ = ["main", "summarize"]

_PACKAGES: tuple[tuple[str, str], ...] = (
    ("/agentmesh/sidecar/", "agentmesh.sidecar"),
    ("/agentmesh/", "agentmesh (other)"),
    ("/bench/", "bench harness"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "multidict/yarl"),
    ("/yarl/", "multidict/yarl"),
    ("/uvicorn/", "uvicorn"),
    ("/httptools/", "httptools"),
    ("/pydantic_core/", "pydantic"),
    ("/pydantic/", "pydantic"),
    ("/prometheus_client/", "prometheus_client"),
    ("/asyncio/", "asyncio"),
    ("/selectors.py", "asyncio"),
    ("/socket.py", "asyncio"),
    ("/contextvars", "asyncio"),
    ("/json/", "json"),
    ("/nats/", "nats"),
    ("/packaging/", "packaging"),
)


def _package(file: str) -> str:
    for needle, name in _PACKAGES:
        if needle in file:
            return name
    if "site-packages" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    return "stdlib/other" if file else "native"


IDLE_LEAVES = frozenset({"EpollSelector.select", "select", "_do_waitpid", "Condition.wait"})
"""Leaf functions that mean "blocked in a system call": py-spy's idle detection misses some
samples of a thread waiting in epoll_wait (here it reported ~80 % of a thread busy whose
/proc CPU was ~55 %) or on a lock (the access-log flusher's timed wait showed as half of the
agent's samples), so these samples are dropped and the shares are shares of real work."""


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive time per function and self time per package, from a speedscope file.

    Samples whose leaf is in :data:`IDLE_LEAVES` are counted apart (``idle_share``) and left
    out of every share.
    """
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    keys = [(f.get("name", "?"), f.get("file", "")) for f in frames]
    self_t: Counter[tuple[str, str]] = Counter()
    incl_t: Counter[tuple[str, str]] = Counter()
    pkg_t: Counter[str] = Counter()
    total = idle = 0.0
    for profile in doc["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            if keys[stack[-1]][0] in IDLE_LEAVES:
                idle += weight
                continue
            total += weight
            leaf = keys[stack[-1]]
            self_t[leaf] += weight
            pkg_t[_package(leaf[1])] += weight
            for key in {keys[i] for i in stack}:
                incl_t[key] += weight

    def rows(counter: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            {"function": name, "file": _short(file), "share": value / total}
            for (name, file), value in counter.most_common(top)
        ]

    return {
        "file": str(path),
        "seconds": total,
        "idle_share": idle / (idle + total) if idle + total else 0.0,
        "self": rows(self_t),
        "inclusive": rows(incl_t),
        "packages": [{"package": k, "share": v / total} for k, v in pkg_t.most_common()],
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _print_summary(summary: dict[str, Any]) -> None:
    print(
        f"{summary['file']}: {summary['seconds']:.2f} s of busy samples; "
        f"{100 * summary['idle_share']:.0f} % more were in epoll_wait/waitpid (dropped)"
    )
    for title, key, label in (
        ("self time by package", "packages", "package"),
        ("top functions by self time", "self", "function"),
        ("top functions by inclusive time", "inclusive", "function"),
    ):
        print(f"\n{title}")
        for row in summary[key]:
            where = f"  ({row['file']})" if "file" in row else ""
            print(f"  {100 * row['share']:5.1f} %  {row[label]}{where}")


_TARGETS = {
    "M1": MeshCall,
    "M2": lambda: MeshCall(mtls=True),
    "M3": TracedMeshCall,
}
"""The mesh targets of ``bench/mesh_targets.py`` a profile can drive (M2: mTLS, M3: every call
traced): comparing one with M1 shows where mTLS or tracing spends its CPU."""


def _profiler_command(args: argparse.Namespace, tool: str, pid: int, result: Path) -> list[str]:
    seconds = str(int(args.duration))
    if args.profiler == "perf":
        # cpu-clock counts only while the task runs: an unbiased CPU profile, native frames
        # (interpreter, C extensions, kernel), no Python function names on 3.11.
        return [
            *(tool, "record", "-e", "cpu-clock", "-F", str(args.rate), "-g", "-p", str(pid)),
            *("-o", str(result), "--", "sleep", seconds),
        ]
    # --idle: keep every sample and drop the waiting ones here (IDLE_LEAVES).
    return [
        *(tool, "record", "--pid", str(pid), "--duration", seconds, "--rate", str(args.rate)),
        *("--format", "speedscope", "--output", str(result), "--idle"),
    ]


async def _record(args: argparse.Namespace, tool: str, out: Path) -> int:
    target = _TARGETS[args.target]()
    suffix = "speedscope.json" if args.profiler == "py-spy" else "perf.data"
    try:
        await target.start()
        payload = make_payload(1024)
        await closed_loop(target.call, payload, args.concurrency, 1.0, None, 10.0)  # warm-up
        pid = os.getpid() if args.side == "client" else target.agents[0].pid
        result = out / f"{args.target}-{args.side}-c{args.concurrency}.{suffix}"
        # Popen, not asyncio's subprocess: asyncio watches its children from a thread blocked
        # in waitpid, which py-spy would sample (in the client) as a busy thread.
        profiler = subprocess.Popen(  # noqa: ASYNC220
            _profiler_command(args, tool, pid, result),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.sleep(0.5)  # the profiler attaches
            cpu0 = proc_cpu_seconds(pid)
            raw = await closed_loop(
                target.call, payload, args.concurrency, args.duration, None, 10.0
            )
            cpu = proc_cpu_seconds(pid) - cpu0
            log, _ = await asyncio.to_thread(profiler.communicate, None, 30)
        finally:
            if profiler.poll() is None:
                profiler.kill()
                profiler.wait()
        lat = sorted(raw.latencies_ns)
        calls = len(lat)
        print(
            f"{args.target} {args.side} at {args.concurrency} in flight: "
            f"{calls / raw.elapsed_s:,.0f} calls/s, p50 {percentile(lat, 0.5) / 1e6:.3f} ms, "
            f"errors {raw.errors}; {args.side} CPU {1e6 * cpu / max(calls, 1):.0f} us/call "
            f"({100 * cpu / raw.elapsed_s:.0f} % of a core, /proc); {args.profiler} exit "
            f"{profiler.returncode}; wrote {result}"
        )
        if profiler.returncode != 0:
            print(log.decode(errors="replace"), file=sys.stderr)
            return 1
    finally:
        await target.stop()
    if args.profiler == "perf":
        _print_perf(tool, result, args.top)
    else:
        _print_summary(summarize(result, args.top))
    return 0


def _print_perf(tool: str, data: Path, top: int) -> None:
    """Shares of CPU samples by binary (DSO) and by native symbol, from ``perf report``."""
    for sort in ("dso", "sym"):
        command = [tool, "report", "-i", str(data), "--no-children", "--stdio", "-g", "none"]
        report = subprocess.run(
            [*command, "--sort", sort],
            capture_output=True,
            text=True,
            check=False,
        )
        rows = [
            line.strip()
            for line in report.stdout.splitlines()
            if line.strip() and not line.startswith("#")
        ]
        print(f"\n{data}: CPU samples by {sort}")
        for row in rows[:top]:
            print(f"  {row}")


def main(argv: Sequence[str] | None = None) -> int:
    """``record`` a profile of one side of M1, or print the ``top`` of a speedscope file."""
    p = argparse.ArgumentParser(prog="bench/profile_mesh.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run M1 under load and profile one side")
    rec.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy")
    rec.add_argument("--target", choices=tuple(_TARGETS), default="M1")
    rec.add_argument("--side", choices=("client", "agent"), default="client")
    rec.add_argument("--concurrency", type=int, default=1)
    rec.add_argument("--duration", type=float, default=8.0, help="seconds profiled (< 60)")
    rec.add_argument("--rate", type=int, default=250, help="samples per second")
    rec.add_argument("--out", type=Path, default=Path("/tmp/agentmesh-profile"))
    rec.add_argument("--top", type=int, default=20)
    top = sub.add_parser("top", help="summarise a speedscope file written by py-spy")
    top.add_argument("file", type=Path)
    top.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    if args.command == "top":
        _print_summary(summarize(args.file, args.top))
        return 0
    if not 0 < args.duration < 60 or args.concurrency < 1:
        print("need 0 < --duration < 60 and --concurrency >= 1", file=sys.stderr)
        return 2
    tool = shutil.which(args.profiler) or str(Path(sys.executable).with_name(args.profiler))
    if not Path(tool).exists():
        print(f"{args.profiler} not found (pip install py-spy; perf: linux-tools)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_record(args, tool, args.out))


if __name__ == "__main__":
    sys.exit(main())
