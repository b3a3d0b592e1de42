"""One NATS connection per process, with the reconnect behaviour the mesh relies on.

The data plane must survive NATS going away, so the client reconnects forever and tells its
users (the lease and the watch-fed index) when it is back, so that they can re-register and
resynchronise instead of trusting whatever a consumer replays. ``url`` may name several servers
(comma-separated seeds of a cluster); nats-py then also learns the cluster's other nodes from the
servers' INFO. When NATS has been away for ``rebootstrap_after`` seconds and a ``rebootstrap``
source is given (the control plane), the server list is asked for again and followed
(``agentmesh.registry.cluster``), so an address change never needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import AuthorizationError, SlowConsumerError

from agentmesh._tasks import STOP_WAIT
from agentmesh._throttle import DropLog
from agentmesh.errors import RegistryUnavailable
from agentmesh.registry.cluster import (
    Rebootstrap,
    ServerFollower,
    default_replicas,
    split_urls,
    through_election,
)
from agentmesh.telemetry.metrics import NATS_DROPPED

__all__ = ["NatsConnection"]

_log = logging.getLogger("agentmesh.registry")


def _not_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns at every close of a TLS stream connection (nats-py's transport): noise."""
    return not record.getMessage().startswith("returning true from eof_received()")


logging.getLogger("asyncio").addFilter(_not_eof_noise)

Listener = Callable[[], Awaitable[None]]
T = TypeVar("T")
#: nats-py connect options naming this process and how it checks the server (TLS, JWT, ...):
#: called at each connect, so renewed credentials are used (see security/nats_client.py).
Credentials = Callable[[], dict[str, Any]]

_MAX_PINGS_OUT = 2
"""Unanswered pings that make a client leave its server (nats-py's default): the interval is
the operator's setting (AGENTMESH_NATS_PING_INTERVAL), this only how many of them."""
_MAX_INFO = 64 * 1024
"""The server's first line (INFO) is a few hundred bytes; more is not a NATS server."""
SUBSCRIPTION_PENDING_BYTES = 8 * 1024 * 1024
"""Bytes of messages one of our subscriptions holds while its callback catches up (nats-py's
default is 128 MiB per subscription, and any mesh client may publish on the telemetry
subjects). 8 MiB is eight of the largest messages NATS accepts (1 MiB): a burst, not a backlog.
Past it NATS drops messages (a slow consumer): logged, counted in agentmesh_nats_dropped."""
SUBSCRIPTION_PENDING_MSGS = 65_536
"""Messages one subscription holds at most (nats-py's default is 512 Ki): small ones are
bounded by count, as large ones are by bytes."""
_REENROL = (
    "re-enrol it with a new join token (`agentmesh token create` on the control plane, "
    "given to it as AGENTMESH_JOIN_TOKEN)"
)


class NatsConnection:
    """A reconnecting NATS client plus reconnect listeners."""

    def __init__(
        self,
        url: str | list[str],
        *,
        name: str,
        rebootstrap: Rebootstrap | None = None,
        rebootstrap_after: float = 5.0,
        kv_replicas: int | None = None,
        jetstream_wait: float = 20.0,
        ping_interval: float = 2.0,
        reconnect_wait: float = 0.25,
        server_timeout: float = 2.0,
        refused_wait_max: float = 30.0,
        credentials: Credentials | None = None,
        identity: Callable[[], str | None] | None = None,
    ) -> None:
        """The timings are settings (``AGENTMESH_NATS_*``; sidecar.py passes them).
        ``identity``: the mesh identity the credentials are for (SPIFFE ID), for the log."""
        self.servers = split_urls(url)
        self.url = ",".join(self.servers)
        self.name = name
        self._credentials = credentials
        self._identity = identity
        #: Reconnect attempts NATS refused our credentials at since it last admitted us.
        self.refusals = 0
        self._refused_wait_max = refused_wait_max
        self._retry_now = asyncio.Event()
        #: The server's INFO at the last :meth:`probe`: ``auth_required``/``tls_required`` say
        #: whether the substrate is open (the control plane and ``agentmesh check`` warn if so).
        self.server_info: dict[str, Any] = {}
        self._nc: NATS | None = None
        self._on_reconnect: list[Listener] = []
        self.connected = asyncio.Event()
        self._closing = False
        self._renewing: asyncio.Task[None] | None = None
        self._jwt_presented = False
        self._kv_replicas = kv_replicas
        #: How long start-up steps wait for JetStream to answer (through a leader election).
        self.jetstream_wait = jetstream_wait
        self.ping_interval = ping_interval
        self._reconnect_wait = reconnect_wait
        self._server_timeout = server_timeout
        self._follower = (
            ServerFollower(self, rebootstrap, rebootstrap_after) if rebootstrap else None
        )
        self._drops = DropLog(_log)

    @property
    def credentials(self) -> Credentials | None:
        """How this connection authenticates and checks the server (TLS): another connection
        to the same servers as someone else keeps the TLS part."""
        return self._credentials

    @property
    def unauthenticated(self) -> bool:
        """The server admits connections without credentials (its INFO at our last probe):
        anyone who can reach it can rewrite policies, revocations and registry records."""
        return bool(self.server_info) and not self.server_info.get("auth_required", False)

    @property
    def client(self) -> NATS:
        if self._nc is None:
            raise RegistryUnavailable(f"NATS at {self.url}: not connected")
        return self._nc

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]] | None = None
    ) -> Subscription:
        """A core NATS subscription whose pending messages are bounded
        (``SUBSCRIPTION_PENDING_BYTES``): every subscription of ours is made here."""
        return await self.client.subscribe(
            subject,
            cb=cb,
            pending_msgs_limit=SUBSCRIPTION_PENDING_MSGS,
            pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
        )

    def _slow_consumer(self, exc: SlowConsumerError) -> None:
        """A subscription was full and NATS dropped a message for it: count, warn now and then."""
        NATS_DROPPED.labels(exc.sub.subject).inc()
        self._drops.drop(
            "dropped %d NATS message(s) (last on %s for %s): the subscription held %d bytes "
            "unprocessed",
            exc.subject,
            self.name,
            SUBSCRIPTION_PENDING_BYTES,
        )

    def replicas(self) -> int:
        """Replicas of the buckets this process creates: the setting, else min(3, the number
        of servers the cluster advertises) (``agentmesh.registry.cluster``)."""
        return self._kv_replicas or default_replicas(self.client)

    async def through_election(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """``op()`` retried while JetStream does not answer, up to ``jetstream_wait`` seconds."""
        return await through_election(op, wait=self.jetstream_wait, what=what)

    def on_reconnect(self, listener: Listener) -> None:
        """Call ``listener`` each time the connection comes back after a loss."""
        self._on_reconnect.append(listener)

    async def connect(self, timeout: float = 5.0) -> None:
        async def disconnected() -> None:
            was_connected = self.connected.is_set()
            self.connected.clear()
            if was_connected and self._renewing is not None:
                _log.info("reconnecting to NATS at %s with renewed credentials", self.url)
            elif was_connected and not self._closing:
                _log.warning("lost NATS at %s; reconnecting", self.url)
                if self._follower is not None:
                    self._follower.lost()

        async def reconnected() -> None:
            self.connected.set()
            self._renewing = None
            if self.refusals:
                _log.info("NATS at %s admits %s again", self.url, self._who())
                self.refusals = 0
            _log.info("reconnected to NATS at %s", self.url)
            for listener in list(self._on_reconnect):
                try:
                    await listener()
                except Exception:
                    _log.exception("reconnect listener failed")

        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def error(exc: Exception) -> None:
            if isinstance(exc, SlowConsumerError):
                self._slow_consumer(exc)
                return
            _log.debug("NATS %s: %s", self.url, exc)
            if not refused.done():
                if _is_refusal(exc):
                    refused.set_result(exc)  # the first connect: a refusal ends it at once
            elif _credentials_refused(exc) and not self._closing:
                await self._back_off(exc)

        async def closed() -> None:
            self.connected.clear()
            if self._nc is None or self._closing:  # a first connect that failed, or ours
                return
            reason = self._nc.last_error
            if reason is not None and _credentials_refused(reason):
                _log.error(
                    "NATS at %s closed the connection of %s (%s): its credentials are revoked "
                    "or expired, and no reconnect follows; %s, and restart it",
                    self.url,
                    self._who(),
                    reason,
                    _REENROL,
                )
            else:
                _log.error(
                    "NATS at %s closed this connection for good (%s); restart this process",
                    self.url,
                    reason or "no reason given",
                )

        # nats-py annotates some of these as int, but takes seconds as floats.
        options: dict[str, Any] = {
            "name": self.name,
            # Per server: a stalled node (it accepts TCP, never answers) must not use up the
            # whole budget before the next seed is tried.
            "connect_timeout": min(timeout, self._server_timeout),
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self._reconnect_wait,
            # Two unanswered pings mark the server stale: a hung node (a stalled VM) is left
            # for another within about three intervals.
            "ping_interval": self.ping_interval,
            "max_outstanding_pings": _MAX_PINGS_OUT,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            "closed_cb": closed,
        }
        if self._credentials is not None:
            options.update(self._credentials())
        jwt_cb = options.get("user_jwt_cb")
        if jwt_cb is not None:

            def presented() -> Any:
                # nats-py asks only when the server wants credentials (its INFO has a nonce).
                self._jwt_presented = True
                return jwt_cb()

            options["user_jwt_cb"] = presented
        nc = NATS()
        connecting: asyncio.Future[Any] | None = None
        try:
            await _reachable(self.servers, timeout)
            # nats-py retries even the first connection forever when reconnects are unlimited:
            # bound it, so a wrong URL is an error, not a hang, and refused credentials or a
            # refused certificate are that error at once.
            budget = timeout + self._server_timeout * (len(self.servers) - 1)
            connecting = asyncio.ensure_future(nc.connect(servers=self.servers, **options))
            racing: set[asyncio.Future[Any]] = {connecting, refused}
            await asyncio.wait(racing, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            if refused.done():
                raise refused.result()
            if not connecting.done():
                raise TimeoutError
            connecting.result()
        except Exception as exc:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
            with contextlib.suppress(Exception):
                await nc.close()
            raise self._unavailable(exc, timeout) from exc
        finally:
            refused.cancel()
        self._nc = nc
        self.connected.set()

    def credentials_renewed(self) -> None:
        """Reconnect now, with the credentials of a renewed certificate.

        The server closes a connection whose user JWT expires, and nats-py then gives up for
        good; reconnecting at renewal (half the certificate's life) means that never happens.
        A reconnect that waits out a refusal of the old credentials tries the new ones at once.
        """
        self._retry_now.set()
        nc = self._nc
        if nc is None or not nc.is_connected or not self._jwt_presented:
            return  # an open NATS never saw the JWT: nothing expires there
        task = asyncio.get_running_loop().create_task(nc.force_reconnect())
        self._renewing = task  # held: the loop keeps only weak references to tasks

    async def _back_off(self, exc: Exception) -> None:
        """NATS refused our credentials at a reconnect (revoked or expired while we were away):
        say so once, then pause before the next attempt, doubling from the reconnect wait up to
        ``refused_wait_max``, so a refused workload does not knock 4 times a second for ever.
        New credentials end a pause. nats-py awaits its error callback between attempts; the
        attempts counted in tests/nats/test_embedded.py (``..._backs_off_says_why_...``) hold
        it to that."""
        if not self.refusals:
            _log.error(
                "NATS at %s refused %s (%s): its credentials are revoked or expired; retrying "
                "at most every %gs. To readmit it, %s",
                self.url,
                self._who(),
                exc,
                self._refused_wait_max,
                _REENROL,
            )
        pause = min(self._reconnect_wait * 2 ** min(self.refusals, 32), self._refused_wait_max)
        self.refusals += 1
        # Set already: credentials came since the last pause, maybe while the refused attempt
        # was under way with the old ones; the next attempt has them.
        if not self._retry_now.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._retry_now.wait()
        self._retry_now.clear()

    def _who(self) -> str:
        """This connection's name, and the mesh identity its credentials are for."""
        identity = self._identity() if self._identity is not None else None
        return f"{self.name} ({identity})" if identity else self.name

    async def probe(self, timeout: float = 5.0) -> dict[str, Any]:
        """Read the first server's INFO (into :attr:`server_info`) without connecting as a
        client: whether it wants credentials (``agentmesh check``, the control plane's warning)."""
        try:
            self.server_info = await _server_info(self.servers[0], timeout)
        except Exception as exc:
            raise self._unavailable(exc, timeout) from exc
        return self.server_info

    def _unavailable(self, exc: Exception, timeout: float) -> RegistryUnavailable:
        if isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g}s"
        else:
            reason = str(exc) or type(exc).__name__
        hint = "is nats-server running?"
        if _is_refusal(exc):
            hint = (
                "it refuses us or we refuse it: mesh credentials come with enrolment "
                "(AGENTMESH_MTLS must not be off), or set AGENTMESH_NATS_CREDS_FILE / "
                "AGENTMESH_NATS_TLS_CA_FILE for an operator-run NATS"
            )
            if _credentials_refused(exc):
                hint += f"; credentials revoked or expired: {_REENROL}"
        return RegistryUnavailable(f"NATS at {self.url}: cannot connect ({reason}); {hint}")

    async def close(self) -> None:
        self._closing = True
        if self._follower is not None:
            await self._follower.stop()
        if self._nc is not None and not self._nc.is_closed:
            # close, not drain: close also writes out what is pending first, and our watches and
            # subscriptions are stopped by now. nats-py's drain swallows a cancellation and then
            # waits for a flush that a hung server never answers (10 s), past any bound set here.
            # Bounded all the same: a TLS close waits for the server's close_notify.
            try:
                async with asyncio.timeout(STOP_WAIT):
                    await self._nc.close()
            except Exception as exc:
                _log.warning("NATS at %s: not closed cleanly (%r); dropped", self.url, exc)
        self._nc = None


async def _reachable(servers: list[str], timeout: float) -> None:
    """Fail fast when no seed accepts a connection: nats-py would retry until the timeout.

    One answering seed is enough (a cluster with a node down is still reachable).
    """
    error: BaseException = OSError("no server to try")
    for url in servers:
        parsed = urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            error = exc
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise error


def _credentials_refused(exc: BaseException) -> bool:
    """The server refused our credentials (at a reconnect: "Authorization Violation"), or
    ended them ("User Authentication Revoked" / "... Expired"): the same ones cannot succeed."""
    text = str(exc).lower()
    return isinstance(exc, AuthorizationError) or any(
        marker in text
        for marker in (
            "authorization violation",
            "authentication revoked",
            "authentication expired",
        )
    )


def _is_refusal(exc: BaseException) -> bool:
    """No retry of a first connect helps: the server refused our credentials, or TLS refused
    the server (or us)."""
    text = str(exc).lower()
    return isinstance(exc, ssl.SSLError) or "authorization" in text or "authentication" in text


async def _server_info(url: str, timeout: float) -> dict[str, Any]:
    """The server's INFO (sent in plain text before any TLS or authentication)."""
    parsed = urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=_MAX_INFO)
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    except (ValueError, OSError, TimeoutError):  # a TLS-first server says nothing: no INFO
        line = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = line.partition(b" ")
    try:
        info = json.loads(body) if head == b"INFO" else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}
