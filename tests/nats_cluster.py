"""A real three-node nats-server cluster on 127.0.0.1, run from ``examples/deploy``'s files.

The three node files are copied unchanged; only the addresses files they include are written
here (free ports, store directories under the test's tmp dir), as the deploy docs tell an
operator to do for their machines. Used by the cluster tests and by ``bench/soak.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path

from agentmesh.nats_server import NatsServer

__all__ = ["DEPLOY", "NODES", "NatsCluster"]

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"
NODES = ("a", "b", "c")
FORM_TIMEOUT = 60.0  # generous: three servers electing a JetStream meta leader on shared cores


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class NatsCluster:
    """Nodes ``nats-a``, ``nats-b``, ``nats-c``, each a :class:`NatsServer` on its config file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(3 * len(NODES))
        self.client_ports = dict(zip(NODES, ports[0:3], strict=True))
        route_ports = dict(zip(NODES, ports[3:6], strict=True))
        self.monitor_ports = dict(zip(NODES, ports[6:9], strict=True))
        routes = "\n".join(f'  "nats-route://127.0.0.1:{route_ports[n]}"' for n in NODES)
        self.servers: dict[str, NatsServer] = {}
        for node in NODES:
            shutil.copy(DEPLOY / f"nats-{node}.conf", root / f"nats-{node}.conf")
            (root / f"addresses-{node}.conf").write_text(
                f'CLIENT: "127.0.0.1:{self.client_ports[node]}"\n'
                f'ROUTE: "127.0.0.1:{route_ports[node]}"\n'
                f'MONITOR: "127.0.0.1:{self.monitor_ports[node]}"\n'
                f'STORE: "{root / "data" / node}"\n'
                f"ROUTES: [\n{routes}\n]\n"
            )
            self.servers[node] = NatsServer(root / f"log-{node}", config=root / f"nats-{node}.conf")

    def url(self, node: str) -> str:
        return f"nats://127.0.0.1:{self.client_ports[node]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(n) for n in NODES]

    @property
    def seeds(self) -> str:
        """``AGENTMESH_NATS_URL`` for this cluster: every node, comma-separated."""
        return ",".join(self.urls)

    @property
    def monitor_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.monitor_ports[n]}" for n in NODES]

    def start(self) -> None:
        """Start every node that is not running, then wait until JetStream has a meta leader
        that sees all three (so R3 buckets can be placed)."""
        for server in self.servers.values():
            if not server.running:
                server.start(timeout=30)
        self.wait_formed()

    def jsz(self, node: str) -> dict[str, object] | None:
        try:
            url = f"http://127.0.0.1:{self.monitor_ports[node]}/jsz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, object] = json.loads(resp.read())
                return data
        except OSError:
            return None

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as the running nodes report it, if they agree on one."""
        for node, server in self.servers.items():
            if not server.running:
                continue
            meta = (self.jsz(node) or {}).get("meta_cluster")
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    def wait_formed(self, timeout: float = FORM_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            metas = [
                (self.jsz(n) or {}).get("meta_cluster")
                for n, s in self.servers.items()
                if s.running
            ]
            if metas and all(
                isinstance(m, dict)
                and m.get("leader")
                and m.get("cluster_size") == len(NODES)
                and all(not r.get("offline") for r in m.get("replicas") or [])
                for m in metas
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the NATS cluster did not form within {timeout}s: {metas}")
            time.sleep(0.2)

    def kill(self, node: str) -> None:
        """SIGKILL: no goodbye to peers or clients."""
        pid = self.servers[node].pid
        assert pid is not None, f"nats-{node} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.servers[node].running and time.monotonic() < deadline:
            time.sleep(0.01)

    def pause(self, node: str) -> int:
        """SIGSTOP: the node hangs (a stalled VM, a GC pause); :meth:`resume` ends it."""
        pid = self.servers[node].pid
        assert pid is not None, f"nats-{node} is not running"
        os.kill(pid, signal.SIGSTOP)
        return pid

    def resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def restart(self, node: str) -> None:
        self.servers[node].stop()
        self.servers[node].start(timeout=30)

    def stop(self) -> None:
        for server in self.servers.values():
            pid = server.pid
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # a paused node cannot act on SIGTERM
            server.stop()
