"""The in-process sidecar: NATS connection, registry index, and the outbound stack.

One per process. An agent's capabilities and any orchestration code in the same process share
it, so calling another capability from inside a capability opens no second connection.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

from agentmesh.models import Bootstrap, BreakerEvent
from agentmesh.policy.cache import PolicyCache
from agentmesh.policy.store import PolicyStore, policy_bucket
from agentmesh.registry import LocalIndex, NatsConnection, RegistryStore
from agentmesh.registry.cluster import Rebootstrap, split_urls
from agentmesh.security.nats_client import nats_credentials
from agentmesh.security.workload import WorkloadIdentity
from agentmesh.settings import Settings
from agentmesh.sidecar.bootstrap import bootstrap
from agentmesh.sidecar.breaker import BreakerState
from agentmesh.sidecar.http1 import Limits
from agentmesh.sidecar.retry import default_policy
from agentmesh.sidecar.stack import OutboundStack, build_outbound
from agentmesh.sidecar.transport import HttpTransport
from agentmesh.telemetry.stats import StatsCollector

__all__ = ["Sidecar", "breaker_subject", "serving_sidecar"]

_log = logging.getLogger("agentmesh.sidecar")


class Sidecar:
    def __init__(
        self,
        boot: Bootstrap,
        settings: Settings,
        *,
        name: str,
        caller: str = "client",
        follow_control: bool = True,
    ) -> None:
        self.boot = boot
        #: This sidecar's mesh identity: mTLS certificate, trust bundle, revocations; and
        #: the NATS user JWT that came with the certificate.
        self.identity = WorkloadIdentity.for_caller(settings, caller)
        #: Bootstrapped from the control plane (no AGENTMESH_NATS_URL): follow NATS if it moves.
        follow = follow_control and not settings.nats_url
        self.conn = NatsConnection(
            boot.nats_url,
            name=name,
            rebootstrap=_nats_servers_from(settings) if follow else None,
            rebootstrap_after=settings.nats_rebootstrap_after,
            kv_replicas=settings.kv_replicas,
            jetstream_wait=settings.jetstream_wait,
            ping_interval=settings.nats_ping_interval,
            reconnect_wait=settings.nats_reconnect_wait,
            server_timeout=settings.nats_connect_timeout,
            refused_wait_max=settings.nats_refused_wait_max,
            credentials=nats_credentials(settings, self.identity),
            identity=self._own_spiffe,
        )
        self.identity.on_nats_renewed(self.conn.credentials_renewed)
        self.store = RegistryStore(self.conn, boot.registry_bucket)
        self._background: set[asyncio.Task[None]] = set()
        #: The last token of our stats and breaker subjects: the agent's name, ``client`` or
        #: ``control``, the only one NATS lets us publish on (security/nats_auth.py).
        self._publisher = caller
        #: What this sidecar takes from NATS (signed records and policies); None with mTLS off.
        trust = self.identity.state_trust()
        self.index = LocalIndex(
            trust,
            verify_batch=settings.registry_verify_batch,
            unverified_bytes=settings.registry_unverified_bytes,
            max_instances_per_agent=settings.registry_max_instances_per_agent,
        )
        self.transport = HttpTransport(self.identity, limits=Limits.from_settings(settings))
        self.name = name
        self.stats = StatsCollector(
            name, interval=settings.stats_interval, tap_payloads=settings.tap_payloads
        )
        #: The access and traffic policies this sidecar enforces, watch-fed from their bucket.
        self.policies = PolicyCache(
            PolicyStore(self.conn, policy_bucket(boot.registry_bucket)),
            self.index,
            default=settings.access_default,
            retry=default_policy(settings),
            trust=trust,
        )
        self.outbound: OutboundStack = build_outbound(
            self.index,
            self.transport,
            settings,
            caller=caller,
            on_breaker_change=self._publish_breaker,
            stats=self.stats,
            policies=self.policies,
            own_spiffe=self._own_spiffe,
        )

    def _own_spiffe(self) -> str | None:
        """This sidecar's verified SPIFFE ID (once it holds a certificate): the access layer
        decides as the receivers will, who see that identity."""
        return self.identity.id.uri if self.identity.id is not None else None

    def _publish_breaker(self, instance_id: str, old: BreakerState, new: BreakerState) -> None:
        """Tell the control plane, so that ``agentmesh agents`` can show who ejects whom."""
        event = BreakerEvent(observer=self.name, instance_id=instance_id, state=new)
        subject = breaker_subject(self.boot.registry_bucket, self._publisher)
        try:
            client = self.conn.client
            task = asyncio.get_running_loop().create_task(
                client.publish(subject, event.model_dump_json().encode())
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        except Exception as exc:
            _log.debug("breaker event not published: %s", exc)

    async def start(self, *, sync_timeout: float | None = None) -> None:
        """Enrol (NATS credentials come with the certificate), connect, open the registry and
        wait for the index's first full view (for up to ``sync_timeout`` seconds, by default
        AGENTMESH_JETSTREAM_WAIT)."""
        if sync_timeout is None:
            sync_timeout = self.conn.jetstream_wait
        try:
            await self.identity.prepare(self.boot.registry_bucket)
        except BaseException:
            await self.identity.close()
            raise
        await self.conn.connect()
        try:
            await self.store.open()
            await self.identity.start(self.conn, self.boot.registry_bucket)
            if self.identity.enabled:
                self.store.seal = self.identity.seal_record
            self.index.start(self.store, self.conn)
            await self.policies.open_store()
            self.policies.start(self.conn)
            await self.index.wait_synced(sync_timeout)
            # Never serve or call before the policies are known (a deny rule may be among them).
            await self.policies.wait_synced(sync_timeout)
            await self.stats.start(self.conn, self.boot.registry_bucket, self._publisher)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.stats.close()
        await self.policies.stop()
        await self.index.stop()
        await self.transport.close()
        await self.identity.close()
        await self.conn.close()


#: The sidecar of the agent serving the current inbound call: ``connect()`` inside a
#: capability reuses it instead of opening a second connection.
serving_sidecar: ContextVar[Sidecar | None] = ContextVar("agentmesh_sidecar", default=None)


def _nats_servers_from(settings: Settings) -> Rebootstrap:
    """Where the control plane says NATS is now (asked again when NATS is lost for long)."""

    async def servers() -> list[str]:
        return split_urls((await bootstrap(settings)).nats_url)

    return servers


def breaker_subject(bucket: str, who: str = "*") -> str:
    """The NATS subject of breaker events ``who`` observes, in the mesh of ``bucket``.

    ``who`` is the observer's agent name (or ``client``/``control``), so that NATS permissions
    let each agent publish its own events only; ``*`` subscribes to all.
    """
    return f"agentmesh.breaker.{bucket}.{who}"
