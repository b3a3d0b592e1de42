"""The app as a child of the sidecar (``agentmesh sidecar ... -- CMD``): start, watch, stop.

The child gets ``AGENTMESH_APP_PORT`` (where it must listen) and ``AGENTMESH_EGRESS_URL``, and
none of the sidecar's other ``AGENTMESH_*`` settings (tokens, CA files); its output goes to the
sidecar's. A child that exits on its own is restarted with a growing pause
(its instance is out of rotation meanwhile, as readiness follows the app), so a crash loop never
spins the CPU. Stopping sends SIGTERM, waits the grace period, then SIGKILL. A child dies with
its sidecar (a parent-death signal): a sidecar only stops apps it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from agentmesh._process import parent_death_hook
from agentmesh._tasks import stop_task
from agentmesh.errors import ConfigurationError

__all__ = ["APP_PORT_ENV", "EGRESS_URL_ENV", "AppProcess"]

APP_PORT_ENV = "AGENTMESH_APP_PORT"
EGRESS_URL_ENV = "AGENTMESH_EGRESS_URL"
#: Signals passed on to the app as they are (SIGTERM/SIGINT drain the sidecar first).
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_log = logging.getLogger("agentmesh.sidecar")


class AppProcess:
    """One supervised child process running ``command``."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        backoff: float,
        backoff_max: float,
        grace: float,
    ) -> None:
        if not command:
            raise ConfigurationError("sidecar: an empty app command after '--'")
        self.command = list(command)
        # The sidecar's own settings (join token, admin token, CA files) are none of the app's
        # business: the app gets the environment without them, plus its two variables.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
        self._env = {**inherited, **env}
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._grace = grace
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        """Start the child and its supervisor (which restarts it if it exits on its own)."""
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="agentmesh-app-supervisor")

    async def _spawn(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C reaches the sidecar alone, which drains
                # first and then stops the app (the app would otherwise quit mid-call).
                start_new_session=True,
                preexec_fn=parent_death_hook(),
            )
        except OSError as exc:
            raise ConfigurationError(
                f"sidecar: cannot start the app {self.command[0]!r}: {exc.strerror or exc}"
            ) from exc
        _log.info("started the app (pid %d): %s", self.proc.pid, " ".join(self.command))

    async def _supervise(self) -> None:
        pause = self._backoff
        while not self._stopping:
            assert self.proc is not None
            started = asyncio.get_running_loop().time()
            code = await self.proc.wait()
            if self._stopping:
                return
            if asyncio.get_running_loop().time() - started > 10 * self._backoff_max:
                pause = self._backoff  # it ran for a good while: not a crash loop
            _log.warning(
                "the app (pid %d) exited with code %s; restarting it in %gs",
                self.proc.pid,
                code,
                pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._backoff_max)
            if self._stopping:
                return
            try:
                await self._spawn()
            except ConfigurationError as exc:
                _log.error("%s; retrying", exc)
                continue
            self.restarts += 1

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period; returns the exit code."""
        self._stopping = True
        await stop_task(self._task, "supervising the app")
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            self.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._grace):
                    await proc.wait()
            except TimeoutError:
                _log.warning(
                    "the app (pid %d) ignored SIGTERM for %gs: killed", proc.pid, self._grace
                )
                self.send_signal(signal.SIGKILL)
                await proc.wait()
        return proc.returncode
