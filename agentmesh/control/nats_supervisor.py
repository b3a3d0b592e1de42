"""The control plane's embedded nats-server: one stable address, kept alive.

Agents reconnect to the address they were given, so the embedded server must come back where it
was: its client port is chosen once, outside the kernel's ephemeral range (:func:`stable_port`),
or set with ``AGENTMESH_EMBEDDED_NATS_PORT``, and kept in ``<data dir>/nats/port``; a restarted
control plane starts it there again, and says clearly when another process holds that port.
If the server dies while the control plane runs, it is restarted on the same port and store,
with a growing pause between attempts, one log line per restart, and at most
``AGENTMESH_EMBEDDED_NATS_MAX_RESTARTS`` restarts within
``AGENTMESH_EMBEDDED_NATS_RESTART_WINDOW`` seconds (a server that keeps dying has a cause no
restart fixes: then the state is ``failed`` and ``/healthz`` and ``agentmesh check`` say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import deque
from pathlib import Path
from typing import Literal

from agentmesh.errors import ConfigurationError, RegistryUnavailable
from agentmesh.nats_server import NatsServer
from agentmesh.settings import Settings

__all__ = ["EmbeddedNats", "NatsState", "stable_port"]

_log = logging.getLogger("agentmesh.control")

NatsState = Literal["starting", "running", "restarting", "failed", "stopped"]

PORT_FILE = "port"
_POLL = 0.2
"""Seconds between looks at the child (a non-blocking waitpid): a dead server is noticed within
this time. Not an operator's choice: it costs nothing and is well below the restart pause."""


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000
"""Stable ports are drawn from here up to the ephemeral range: well-known and most registered
services' ports lie below it."""
_TRIES = 64


def stable_port(host: str = "127.0.0.1") -> int:
    """A free port outside the kernel's ephemeral range, for a listener that must come back on
    the same port after a restart; 0 (let the server choose) where that range is unknown.

    A port from the ephemeral range (where port 0 draws from) may, while its listener is down,
    become the local port of any outgoing connection on the machine, and a listener cannot bind
    it again until that connection closes ("address already in use"): a restarted control plane
    would then refuse to start. The kernel never hands out a port below the range on its own.
    """
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    candidates = list(range(_LOWEST_PORT, low))
    for port in random.sample(candidates, min(_TRIES, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    return 0


def kept_port(store: Path) -> int:
    """The port kept in ``store/port`` by an earlier run; 0 if none (then one is chosen)."""
    try:
        return int((store / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


class EmbeddedNats:
    """One embedded nats-server plus its supervisor state (what ``/healthz`` reports)."""

    def __init__(
        self, settings: Settings, *, extra_config: Path | None = None, tls: bool = False
    ) -> None:
        """``extra_config``/``tls``: TLS and the mesh's accounts (nats_config.secure_embedded)."""
        self.store = settings.data_dir / "nats"
        self._port_file = self.store / PORT_FILE
        port = settings.embedded_nats_port or kept_port(self.store) or stable_port()
        self.server = NatsServer(
            self.store,
            port=port,
            binary=settings.nats_server_bin,
            extra_config=extra_config,
            tls=tls,
        )
        self._max_restarts = settings.embedded_nats_max_restarts
        self._window = settings.embedded_nats_restart_window
        self._first_pause = settings.embedded_nats_restart_pause
        self._max_pause = settings.embedded_nats_restart_max_pause
        self.state: NatsState = "starting"
        self.restarts = 0
        self.last_exit: str | None = None
        self._recent: deque[float] = deque()

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        """Start on the kept port (blocking; from the main thread, see :class:`NatsServer`)."""
        port = self.server.port
        try:
            self.server.start()
        except RegistryUnavailable as exc:
            if port and "address already in use" in str(exc):
                raise ConfigurationError(
                    f"embedded NATS port {port} (kept in {self._port_file} so that running "
                    "agents find NATS again after a restart) is in use by another process: stop "
                    "it, or delete that file to choose a new port (agents then follow within "
                    "AGENTMESH_NATS_REBOOTSTRAP_AFTER seconds)"
                ) from exc
            raise
        self._port_file.write_text(f"{self.server.port}\n")
        self.state = "running"

    def status(self) -> dict[str, object]:
        """What ``/healthz`` says about the embedded server."""
        return {
            "mode": "embedded",
            "state": self.state,
            "url": self.url,
            "pid": self.server.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }

    async def supervise(self) -> None:
        """Restart the server whenever it dies, until the restart limit is reached."""
        pause = self._first_pause
        while True:
            await asyncio.sleep(_POLL)
            if self.state == "running":
                code = self.server.exit_code
                if code is None:
                    continue
                self.last_exit = f"signal {-code}" if code < 0 else f"exit code {code}"
            now = time.monotonic()
            while self._recent and self._recent[0] < now - self._window:
                self._recent.popleft()
            if len(self._recent) >= self._max_restarts:
                self.state = "failed"
                _log.error(
                    "embedded nats-server %s (%s) died %d times within %gs; not restarting "
                    "it again (see %s)",
                    self.url,
                    self.last_exit,
                    len(self._recent) + 1,
                    self._window,
                    self.server.log_path,
                )
                return
            pause = min(pause * 2, self._max_pause) if self._recent else self._first_pause
            self._recent.append(now)
            self.restarts += 1
            self.state = "restarting"
            _log.warning(
                "embedded nats-server %s died (%s); restart %d of at most %d per %gs in %.1fs",
                self.url,
                self.last_exit,
                self.restarts,
                self._max_restarts,
                self._window,
                pause,
            )
            await asyncio.sleep(pause)
            try:
                await self.server.start_async()
            except (RegistryUnavailable, ConfigurationError) as exc:
                self.last_exit = f"restart failed: {exc}"
                _log.warning("embedded nats-server did not come back: %s", exc)
                continue
            self.state = "running"
            _log.info("embedded nats-server back at %s (pid %s)", self.url, self.server.pid)

    def stop(self) -> None:
        self.state = "stopped"
        with contextlib.suppress(Exception):
            self.server.stop()
