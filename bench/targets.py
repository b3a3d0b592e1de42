"""What the harness benchmarks: the :class:`Target` plug-in interface (a client in this process,
servers in others) and :class:`ProcessTarget`, which owns its child processes.

A new target is a :class:`Target` subclass plus one registry entry (``bench.run.TARGETS``).
"""

from __future__ import annotations

import abc
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .processes import ServerProcess

__all__ = ["ProcessTarget", "Target", "TargetFactory"]


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

    def stop_shared(self) -> None:
        """Stop what the children used and this process started (a NATS server), after them
        and before the work directory goes; default: nothing."""

    async def stop(self) -> None:
        """Close the client first (so servers see a clean goodbye), then stop the children."""
        try:
            await self.close_client()
        finally:
            for proc in reversed(self.processes):
                proc.stop()
            self.stop_shared()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def details(self) -> dict[str, str]:
        """Whatever the subclass recorded in ``facts`` while starting."""
        return dict(self.facts)


TargetFactory = Callable[[], Target]
"""What the registry holds: a zero-argument callable (usually the class) making a target."""
