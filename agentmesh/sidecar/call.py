"""The values that flow through the outbound layers, and the shape every layer shares.

Each layer is a ``Handler``: it takes an :class:`OutboundCall` and returns a :class:`Reply`,
usually by calling the next handler. Layers fill in the call as it goes down (resolve sets
``targets``, balance sets ``target``) and nothing above the transport knows about HTTP, so a
NATS transport can slot in by URL scheme later.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet

from agentmesh._config import TrafficRoute
from agentmesh.registry.index import Target

__all__ = ["Handler", "OutboundCall", "Reply"]


@dataclass(slots=True)
class OutboundCall:
    """One logical call on its way out."""

    capability: str
    body: bytes
    deadline: float = 0.0
    """When the whole call must be over, on the event loop's clock (set by the deadline layer)."""
    timeout: float | None = None
    """The caller's budget in seconds; None: the deadline layer picks it (TrafficPolicy,
    capability, ``AGENTMESH_CALL_TIMEOUT``) and writes here the budget the call really has."""
    stream: bool = False
    version: SpecifierSet | None = None
    tags: Iterable[str] | None = None
    labels: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retries: int | None = None
    """Retries allowed for this call (None: the sidecar's policy; 0: never retry)."""
    idempotent: bool = False
    """The caller vouches that running it twice is harmless (an idempotency key was given)."""
    affinity_key: str | None = None
    """Calls with the same key stick to one instance while it is healthy."""
    first_chunk_timeout: float | None = None
    chunk_timeout: float | None = None
    targets: tuple[Target, ...] = ()
    target: Target | None = None
    excluded: tuple[str, ...] = ()
    """Instances that already failed this call: a retry prefers others."""
    attempt: int = 1
    per_try_timeout: float | None = None
    """The bound on each attempt (set by the retry layer, enforced below the breaker)."""
    traffic: TrafficRoute | None = None
    """The capability's TrafficPolicy (set by the route layer): the overrides the deadline,
    retry, balance and breaker layers read. None: the sidecar's defaults."""


@dataclass(slots=True)
class Reply:
    """What came back: a JSON body, or (streaming) a generator of JSON chunks.

    A generator, not just an iterator: whoever stops reading closes it (``aclose``), and each
    layer that wraps it closes what it wraps, down to the transport's connection, so the agent
    sees the caller leave and stops the stream."""

    target: Target
    body: bytes = b""
    chunks: AsyncGenerator[bytes, None] | None = None


Handler = Callable[[OutboundCall], Awaitable[Reply]]
