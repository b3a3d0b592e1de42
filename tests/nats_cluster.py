"""A real three-node nats-server cluster on 127.0.0.1, run from ``examples/deploy``'s files.

Set up as docs/deploy.md tells an operator to: the three node files are copied unchanged,
``agentmesh nats-config`` writes the mesh's accounts file and the nodes' TLS (from the mesh CA),
and only the addresses files the node files include are written here (free ports, store and TLS
paths under the test's tmp dir). The nodes then admit only clients with a user JWT signed with
the keys in ``data_dir/nats-auth`` (what every control plane of the mesh must hold) and only
peers with a node certificate. Used by the cluster tests and by ``bench/soak.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentmesh import Settings
from agentmesh.nats_server import NatsServer
from agentmesh.registry import NatsConnection
from agentmesh.security.nats_auth import AUTH_DIR
from tests.control.control_process import cli_env, run_cli
from tests.freeze import freeze

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
    """Nodes ``nats-a``, ``nats-b``, ``nats-c``, each a :class:`NatsServer` on its config file.

    ``data_dir``: the control plane's data dir whose NATS keys the nodes trust (created if
    missing); ``ca_env``: where the mesh CA is (``AGENTMESH_CA_CERT_FILE``/``KEY_FILE``), for
    the nodes' certificates.
    """

    def __init__(self, root: Path, data_dir: Path, ca_env: Mapping[str, str]) -> None:
        self.root = root
        self.data_dir = data_dir
        self.ca_env = dict(ca_env)
        root.mkdir(parents=True, exist_ok=True)
        tls = root / "tls"
        made = run_cli(
            "nats-config", "--data-dir", str(data_dir),
            "-o", str(root / "agentmesh-accounts.conf"),
            "--tls-dir", str(tls), "--host", "127.0.0.1", "--host", "localhost",
            env=cli_env(ca_env),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        ports = _free_ports(3 * len(NODES))
        self.client_ports = dict(zip(NODES, ports[0:3], strict=True))
        self.route_ports = dict(zip(NODES, ports[3:6], strict=True))
        self.monitor_ports = dict(zip(NODES, ports[6:9], strict=True))
        routes = "\n".join(f'  "nats-route://127.0.0.1:{self.route_ports[n]}"' for n in NODES)
        self.servers: dict[str, NatsServer] = {}
        for node in NODES:
            shutil.copy(DEPLOY / f"nats-{node}.conf", root / f"nats-{node}.conf")
            (root / f"addresses-{node}.conf").write_text(
                f'CLIENT: "127.0.0.1:{self.client_ports[node]}"\n'
                f'ROUTE: "127.0.0.1:{self.route_ports[node]}"\n'
                f'MONITOR: "127.0.0.1:{self.monitor_ports[node]}"\n'
                f'STORE: "{root / "data" / node}"\n'
                f'TLS_CERT: "{tls / "nats.pem"}"\n'
                f'TLS_KEY: "{tls / "nats.key"}"\n'
                f'TLS_CA: "{tls / "mesh-ca.pem"}"\n'
                f"ROUTES: [\n{routes}\n]\n"
            )
            self.servers[node] = NatsServer(
                root / f"log-{node}", config=root / f"nats-{node}.conf", tls=True
            )

    def share_keys(self, data_dir: Path) -> None:
        """Give a control plane's data dir the NATS keys the nodes trust (as docs/deploy.md
        says every control plane needs)."""
        if data_dir.resolve() != self.data_dir.resolve():  # else it has them
            shutil.copytree(self.data_dir / AUTH_DIR, data_dir / AUTH_DIR, dirs_exist_ok=True)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A process that connects straight to the cluster with the control plane's powers:
        its data dir (the NATS keys) and the mesh CA."""
        return cli_env(
            {
                "AGENTMESH_NATS_URL": self.seeds,
                "AGENTMESH_DATA_DIR": str(self.data_dir),
                **self.ca_env,
                **(extra or {}),
            }
        )

    async def connection(self, bucket: str, **options: Any) -> NatsConnection:
        """A connection with the control plane's powers (as :meth:`env`), e.g. to create
        buckets as another process would have."""
        from agentmesh.security.nats_client import client_connection

        settings = Settings(
            data_dir=self.data_dir,
            ca_cert_file=Path(self.ca_env["AGENTMESH_CA_CERT_FILE"]),
            ca_key_file=Path(self.ca_env["AGENTMESH_CA_KEY_FILE"]),
        )
        return await client_connection(
            settings, self.seeds, bucket, name="tests-cluster", **options
        )

    def url(self, node: str) -> str:
        return f"tls://127.0.0.1:{self.client_ports[node]}"

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

    def monitor(self, node: str, endpoint: str) -> dict[str, Any] | None:
        """A monitoring endpoint's JSON (``jsz``, ``routez`` ...); None if the node is away."""
        try:
            url = f"http://127.0.0.1:{self.monitor_ports[node]}/{endpoint}"
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except OSError:
            return None

    def jsz(self, node: str) -> dict[str, Any] | None:
        return self.monitor(node, "jsz")

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
        freeze(pid)
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
